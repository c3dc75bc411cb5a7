"""A local stand-in for OpenAI's and Vertex AI's fine-tuning REST APIs, for tests with no network.

    with FakeProviders() as fake:
        OpenAI(base_url=fake.openai_url, api_key=fake.api_key)        # /openai/v1/files, /fine_tuning/jobs...
        genai.Client(vertexai=True, ..., http_options={"base_url": fake.vertex_url, "api_version": "v1"})
        fake.fail(429, times=1)                                       # the next request gets a 429

Object shapes follow the providers' documented ones (OpenAI ``fine_tuning.job``, ``fine_tuning.job.event``,
``fine_tuning.job.checkpoint``, ``file``; Vertex ``TuningJob``; Cloud Storage ``storage#object``). A job
moves one state forward each time it is read: OpenAI validating_files -> queued -> running (a metrics
event per step) -> succeeded; Vertex PENDING -> RUNNING -> SUCCEEDED. A base model whose name contains
``fail`` ends failed with an error instead.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

OPENAI_STATES = ["validating_files", "queued", "running", "running", "running", "succeeded"]
VERTEX_STATES = ["JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"]
TOTAL_STEPS = 3


@dataclass
class FakeJob:
    """One job and the state index it has reached."""

    body: dict[str, Any]
    provider: str
    step: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    cancelled: bool = False


def _rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(seconds))


class FakeProviders:
    """The server, its recorded requests and uploads, and knobs to make requests fail."""

    api_key = "sk-test-0123456789secret"
    google_token = "ya29.test-token"

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.uploads: list[dict[str, Any]] = []
        self.jobs: dict[str, FakeJob] = {}
        self._failures: list[int] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        port = self._server.server_address[1]
        self.root = f"http://127.0.0.1:{port}"
        self.openai_url = f"{self.root}/openai/v1"
        self.vertex_url = f"{self.root}/vertex/"
        self.storage_url = f"{self.root}/gcs"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeProviders:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail(self, status: int, times: int = 1) -> None:
        """Answer the next ``times`` requests with HTTP ``status``."""
        self._failures.extend([status] * times)

    # ---- OpenAI -------------------------------------------------------------------------------------
    def _openai(self, method: str, path: str, body: bytes, headers: Any) -> tuple[int, Any]:
        if headers.get("Authorization") != f"Bearer {self.api_key}":
            return 401, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                   "param": None, "code": "invalid_api_key"}}
        if method == "POST" and path == "/files":
            return self._openai_file(body, headers.get("Content-Type", ""))
        if path == "/fine_tuning/jobs":
            if method == "POST":
                return self._openai_create(json.loads(body))
            jobs = [j.body for j in self.jobs.values() if j.provider == "openai"][::-1]
            return 200, {"object": "list", "data": jobs, "has_more": False}
        m = re.fullmatch(r"/fine_tuning/jobs/([^/]+)(/events|/checkpoints|/cancel)?", path)
        if not m or m.group(1) not in self.jobs:
            return 404, {"error": {"message": "No such job", "type": "invalid_request_error", "code": None}}
        job = self.jobs[m.group(1)]
        if m.group(2) == "/events":
            return 200, {"object": "list", "data": job.events[::-1], "has_more": False}
        if m.group(2) == "/checkpoints":
            data = [{"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{s}", "created_at": int(time.time()),
                     "fine_tuned_model_checkpoint": f"ft:{job.body['model']}:org:ckpt-step-{s}",
                     "fine_tuning_job_id": job.body["id"], "step_number": s,
                     "metrics": {"step": s, "train_loss": 1.0 / s}} for s in range(1, TOTAL_STEPS + 1)]
            return 200, {"object": "list", "data": data[::-1], "has_more": False}
        if m.group(2) == "/cancel":
            job.body["status"] = "cancelled"
            job.cancelled = True
            self._openai_event(job, "info", "Fine-tuning job cancelled")
            return 200, job.body
        self._advance_openai(job)
        return 200, job.body

    def _openai_file(self, body: bytes, content_type: str) -> tuple[int, Any]:
        boundary = content_type.split("boundary=")[-1].strip('"').encode()
        fields: dict[str, bytes] = {}
        for part in body.split(b"--" + boundary):
            head, _, value = part.partition(b"\r\n\r\n")
            name = re.search(rb'name="([^"]+)"', head)
            if name:
                fields[name.group(1).decode()] = value.rstrip(b"\r\n")
        if fields.get("purpose") != b"fine-tune" or "file" not in fields:
            return 400, {"error": {"message": "purpose must be fine-tune", "type": "invalid_request_error"}}
        file_id = f"file-{len(self.uploads) + 1}"
        self.uploads.append({"provider": "openai", "id": file_id, "content": fields["file"].decode()})
        return 200, {"object": "file", "id": file_id, "bytes": len(fields["file"]), "created_at": int(time.time()),
                     "filename": "train.jsonl", "purpose": "fine-tune", "status": "processed"}

    def _openai_create(self, req: dict[str, Any]) -> tuple[int, Any]:
        if not any(u["id"] == req.get("training_file") for u in self.uploads):
            return 400, {"error": {"message": "invalid training_file", "type": "invalid_request_error",
                                   "param": "training_file", "code": None}}
        job_id = f"ftjob-{len(self.jobs) + 1:04d}"
        hyper = req.get("method", {}).get("supervised", {}).get("hyperparameters", {})
        body = {"object": "fine_tuning.job", "id": job_id, "model": req["model"], "created_at": int(time.time()),
                "finished_at": None, "fine_tuned_model": None, "organization_id": "org-test", "result_files": [],
                "status": "validating_files", "validation_file": req.get("validation_file"),
                "training_file": req["training_file"], "seed": 42, "trained_tokens": None, "error": None,
                "hyperparameters": {"n_epochs": hyper.get("n_epochs", "auto"),
                                    "batch_size": hyper.get("batch_size", "auto"),
                                    "learning_rate_multiplier": hyper.get("learning_rate_multiplier", "auto")},
                "method": req.get("method"), "metadata": None, "estimated_finish": None, "integrations": []}
        self.jobs[job_id] = job = FakeJob(body, "openai")
        self._openai_event(job, "info", f"Created fine-tuning job: {job_id}")
        return 200, body

    def _openai_event(self, job: FakeJob, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        job.events.append({"object": "fine_tuning.job.event", "id": f"ftevent-{len(job.events) + 1}",
                           "created_at": int(time.time()), "level": level, "message": message,
                           "data": data or {}, "type": "metrics" if data else "message"})

    def _advance_openai(self, job: FakeJob) -> None:
        if job.cancelled or job.step >= len(OPENAI_STATES) - 1:
            return
        job.step += 1
        state = OPENAI_STATES[job.step]
        failing = "fail" in job.body["model"]
        if state == "running":
            step = OPENAI_STATES[: job.step + 1].count("running")
            if failing and step == 2:
                state = "failed"
            else:
                self._openai_event(job, "info", f"Step {step}/{TOTAL_STEPS}: training loss={1.0 / step:.4f}",
                                   {"step": step, "train_loss": 1.0 / step, "total_steps": TOTAL_STEPS})
        if state == "failed":
            job.step = len(OPENAI_STATES) - 1
            job.body["error"] = {"code": "invalid_training_file", "param": "training_file",
                                 "message": "The job failed due to an invalid training file."}
            self._openai_event(job, "error", "Fine-tuning job failed")
        if state == "succeeded":
            job.body.update(fine_tuned_model=f"ft:{job.body['model']}:org-test::abc123", trained_tokens=1234,
                            finished_at=int(time.time()), result_files=["file-result"])
            self._openai_event(job, "info", "The job has successfully completed")
        job.body["status"] = state

    # ---- Vertex AI and Cloud Storage ------------------------------------------------------------------
    def _vertex(self, method: str, path: str, body: bytes, headers: Any) -> tuple[int, Any]:
        if headers.get("Authorization") != f"Bearer {self.google_token}":
            return 401, {"error": {"code": 401, "message": "Request had invalid authentication credentials.",
                                   "status": "UNAUTHENTICATED"}}
        m = re.fullmatch(r"/v1/(projects/[^/]+/locations/[^/]+)/tuningJobs(?:/(\d+))?(:cancel)?", path)
        if not m:
            return 404, {"error": {"code": 404, "message": f"no route {path}", "status": "NOT_FOUND"}}
        parent, number, cancel = m.groups()
        if number is None:
            if method == "POST":
                return self._vertex_create(parent, json.loads(body))
            jobs = [j.body for j in self.jobs.values() if j.provider == "vertex"][::-1]
            return 200, {"tuningJobs": jobs}
        name = f"{parent}/tuningJobs/{number}"
        if name not in self.jobs:
            return 404, {"error": {"code": 404, "message": f"{name} not found", "status": "NOT_FOUND"}}
        job = self.jobs[name]
        if cancel:
            job.cancelled = True
            job.body.update(state="JOB_STATE_CANCELLED", endTime=_rfc3339(time.time()))
            return 200, {}
        if not job.cancelled and job.step < len(VERTEX_STATES) - 1:
            job.step += 1
            state = VERTEX_STATES[job.step]
            if state == "JOB_STATE_RUNNING" and "startTime" not in job.body:
                job.body["startTime"] = _rfc3339(time.time())
            if state == "JOB_STATE_SUCCEEDED" and "fail" in job.body["baseModel"]:
                state = "JOB_STATE_FAILED"
                job.body["error"] = {"code": 3, "message": "Dataset validation failed: bad example at row 2."}
            elif state == "JOB_STATE_SUCCEEDED":
                job.body["tunedModel"] = {"model": f"{job.body['name'].split('/tuningJobs')[0]}/models/77",
                                          "endpoint": f"{job.body['name'].split('/tuningJobs')[0]}/endpoints/88"}
            if state in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"):
                job.body["endTime"] = _rfc3339(time.time())
            job.body["state"] = state
        return 200, job.body

    def _vertex_create(self, parent: str, req: dict[str, Any]) -> tuple[int, Any]:
        kind = "preferenceOptimizationSpec" if "preferenceOptimizationSpec" in req else "supervisedTuningSpec"
        spec = req.get(kind, {})
        uri = spec.get("trainingDatasetUri", "")
        if not any(u.get("uri") == uri for u in self.uploads):
            return 400, {"error": {"code": 400, "message": f"training dataset {uri} not found",
                                   "status": "INVALID_ARGUMENT"}}
        name = f"{parent}/tuningJobs/{1000 + len(self.jobs)}"
        body = {"name": name, "baseModel": req["baseModel"], "state": VERTEX_STATES[0],
                "createTime": _rfc3339(time.time()), kind: spec,
                "tunedModelDisplayName": req.get("tunedModelDisplayName", "")}
        self.jobs[name] = FakeJob(body, "vertex")
        return 200, body

    def _storage(self, method: str, path: str, query: dict[str, list[str]], body: bytes,
                 headers: Any) -> tuple[int, Any]:
        if headers.get("Authorization") != f"Bearer {self.google_token}":
            return 401, {"error": {"code": 401, "message": "Invalid Credentials"}}
        m = re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o", path)
        if method != "POST" or not m or query.get("uploadType") != ["media"]:
            return 404, {"error": {"code": 404, "message": "not found"}}
        name = query["name"][0]
        uri = f"gs://{m.group(1)}/{name}"
        self.uploads.append({"provider": "vertex", "uri": uri, "content": body.decode()})
        return 200, {"kind": "storage#object", "bucket": m.group(1), "name": name, "size": str(len(body))}

    # ---- plumbing -----------------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def _serve(self) -> None:
                url = urlparse(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with fake._lock:
                    fake.requests.append((self.command, url.path))
                    failure = fake._failures.pop(0) if fake._failures else None
                    if failure is not None:
                        status, payload = failure, {"error": {"code": failure, "message": f"simulated {failure}",
                                                              "status": "UNAVAILABLE", "type": "server_error"}}
                    elif url.path.startswith("/openai/v1"):
                        status, payload = fake._openai(self.command, url.path[len("/openai/v1"):], body,
                                                       self.headers)
                    elif url.path.startswith("/vertex"):
                        status, payload = fake._vertex(self.command, url.path[len("/vertex"):], body, self.headers)
                    elif url.path.startswith("/gcs"):
                        status, payload = fake._storage(self.command, url.path[len("/gcs"):],
                                                        parse_qs(url.query), body, self.headers)
                    else:
                        status, payload = 404, {"error": {"message": "unknown path"}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429 or status >= 500:
                    self.send_header("retry-after-ms", "1")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _serve

        return Handler
