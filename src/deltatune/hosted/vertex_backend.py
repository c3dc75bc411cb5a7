"""Vertex AI (Gemini) tuning through the official `google-genai` SDK's ``client.tunings``.

    backend = VertexBackend(project="my-proj", location="us-central1", staging="gs://my-bucket/tuning")
    uri = backend.upload("train.vertex.jsonl")          # gs://my-bucket/tuning/train.vertex-<hash>.jsonl
    info = backend.create(model="gemini-2.5-flash", training=uri, validation=None, epochs=3,
                          lr_multiplier=None, batch_size=None, suffix="dates")

Not built on ``vertexai.tuning``, which Google has deprecated. Credentials are read the way the SDK
reads them: Application Default Credentials (``gcloud auth application-default login`` or
``GOOGLE_APPLICATION_CREDENTIALS``); project and region from the arguments or ``GOOGLE_CLOUD_PROJECT``
/ ``GOOGLE_CLOUD_LOCATION``. Vertex tunes from Cloud Storage, so ``upload`` writes the prepared file to
``staging`` with the Cloud Storage JSON API under the same credentials. ``base_url`` points the SDK at
another endpoint (e.g. a test server); ``storage_url`` (or ``STORAGE_EMULATOR_HOST``, the variable
Google's storage clients read) does the same for the upload.

Vertex has no per-job event list like OpenAI's: :meth:`VertexBackend.events` derives events from the
job's timestamps, state and error (metrics live in the job's Vertex AI experiment).
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deltatune.hosted.jobs import HostedError, JobEvent, JobInfo

SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
STORAGE_URL = "https://storage.googleapis.com"
STATUS = {"JOB_STATE_QUEUED": "queued", "JOB_STATE_PENDING": "queued", "JOB_STATE_RUNNING": "running",
          "JOB_STATE_SUCCEEDED": "succeeded", "JOB_STATE_FAILED": "failed", "JOB_STATE_EXPIRED": "failed",
          "JOB_STATE_CANCELLED": "cancelled"}
RETRY_CODES = (408, 429, 500, 502, 503, 504)


def _auth_hint(code: int) -> str:
    if code == 401:
        return ("; refresh Application Default Credentials (`gcloud auth application-default login`) or set "
                "GOOGLE_APPLICATION_CREDENTIALS")
    if code == 403:
        return "; the account needs the Vertex AI User role (and Storage access to the staging bucket)"
    if code >= 500:
        return "; the service may be down, try again later"
    return ""


@contextmanager
def _sdk_errors(action: str) -> Iterator[None]:
    """Turn SDK and auth exceptions into HostedError with a short message and no credentials."""
    import google.auth.exceptions
    from google.genai import errors

    try:
        yield
    except errors.APIError as err:
        raise HostedError(f"vertex: {action}: HTTP {err.code} {err.status or ''}: {err.message or ''}"
                          f"{_auth_hint(err.code)}") from None
    except google.auth.exceptions.GoogleAuthError as err:
        raise HostedError(f"vertex: {action}: no usable Google Cloud credentials ({type(err).__name__}); run "
                          "`gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS") from None


def _seconds(value: Any) -> float | None:
    return value.timestamp() if value is not None else None


def job_info(job: Any) -> JobInfo:
    """Return a JobInfo from the SDK's TuningJob."""
    raw = job.state.value if job.state is not None and hasattr(job.state, "value") else str(job.state)
    error = None
    if job.error is not None and (job.error.message or job.error.code):
        error = f"{job.error.code}: {job.error.message}" if job.error.code else job.error.message
    elif raw == "JOB_STATE_EXPIRED":
        error = "the job expired"
    tuned = job.tuned_model
    return JobInfo(id=job.name or "", provider="vertex", status=STATUS.get(raw, raw), raw_status=raw,
                   model=job.base_model, fine_tuned_model=(tuned.endpoint or tuned.model) if tuned else None,
                   created_at=_seconds(job.create_time), finished_at=_seconds(job.end_time), error=error,
                   extra={"start_time": _seconds(job.start_time),
                          "tuned_model": tuned.model if tuned else None,
                          "experiment": job.experiment})


def _split_gs(uri: str) -> tuple[str, str]:
    if not uri.startswith("gs://") or len(uri) <= 5:
        raise HostedError(f"--staging {uri!r}: give a Cloud Storage folder as gs://BUCKET[/PREFIX]")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


class VertexBackend:
    """Vertex AI tuning jobs through ``google.genai.Client(vertexai=True).tunings``."""

    name = "vertex"

    def __init__(self, *, project: str | None = None, location: str | None = None, staging: str | None = None,
                 base_url: str | None = None, storage_url: str | None = None, credentials: Any = None,
                 max_retries: int = 3, retry_delay: float = 1.0) -> None:
        from google.genai import Client, types

        self.project = project or os.environ.get("GOOGLE_CLOUD_PROJECT")
        self.location = location or os.environ.get("GOOGLE_CLOUD_LOCATION") or "us-central1"
        if not self.project:
            raise HostedError("vertex: no Google Cloud project; pass --project or set GOOGLE_CLOUD_PROJECT")
        self.staging = staging
        self.storage_url = (storage_url or os.environ.get("STORAGE_EMULATOR_HOST") or STORAGE_URL).rstrip("/")
        self.credentials = credentials
        self.max_retries, self.retry_delay = max_retries, retry_delay
        options = types.HttpOptions(api_version="v1", base_url=base_url, retry_options=types.HttpRetryOptions(
            attempts=max_retries + 1, initial_delay=retry_delay, jitter=retry_delay,
            http_status_codes=list(RETRY_CODES)))
        with _sdk_errors("connect"):
            self.client = Client(vertexai=True, project=self.project, location=self.location,
                                 credentials=credentials, http_options=options)

    def _credentials(self) -> Any:
        if self.credentials is None:
            import google.auth

            with _sdk_errors("credentials"):
                self.credentials, _ = google.auth.default(scopes=SCOPES)
        return self.credentials

    def upload(self, path: str) -> str:
        """Upload a JSONL file to the ``staging`` folder in Cloud Storage; return its gs:// URI."""
        from google.auth.transport.requests import AuthorizedSession

        if not self.staging:
            raise HostedError("vertex: Vertex AI tunes from Cloud Storage; pass --staging gs://BUCKET/PREFIX "
                              "(a folder the training file is uploaded to)")
        bucket, prefix = _split_gs(self.staging)
        data = Path(path).read_bytes()
        name = f"{Path(path).stem}-{hashlib.sha256(data).hexdigest()[:12]}.jsonl"
        name = f"{prefix}/{name}" if prefix else name
        session = AuthorizedSession(self._credentials())
        url = f"{self.storage_url}/upload/storage/v1/b/{bucket}/o"
        for attempt in range(self.max_retries + 1):
            response = session.post(url, params={"uploadType": "media", "name": name}, data=data,
                                    headers={"Content-Type": "application/jsonl"}, timeout=300)
            if response.status_code not in RETRY_CODES or attempt == self.max_retries:
                break
            time.sleep(self.retry_delay * 2 ** attempt)
        if response.status_code >= 400:
            try:
                message = response.json().get("error", {}).get("message", "")
            except ValueError:
                message = response.text[:200]
            raise HostedError(f"vertex: upload {path} to gs://{bucket}/{name}: HTTP {response.status_code}: "
                              f"{message}{_auth_hint(response.status_code)}")
        return f"gs://{bucket}/{name}"

    def create(self, *, model: str, training: str, validation: str | None = None, epochs: int | None = None,
               lr_multiplier: float | None = None, batch_size: int | None = None,
               suffix: str | None = None, preference: bool = False, beta: float | None = None) -> JobInfo:
        """Create a supervised tuning job, or with ``preference`` a preference tuning job (``beta``), from gs://
        URIs; return its first snapshot."""
        from google.genai import types

        method = {"method": types.TuningMethod.PREFERENCE_TUNING, "beta": beta} if preference else {}
        config = types.CreateTuningJobConfig(
            **method,
            epoch_count=epochs, learning_rate_multiplier=lr_multiplier, batch_size=batch_size,
            tuned_model_display_name=suffix,
            validation_dataset=types.TuningValidationDataset(gcs_uri=validation) if validation else None)
        with _sdk_errors("create job"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the SDK marks tune() experimental on every call
            job = self.client.tunings.tune(base_model=model, training_dataset=types.TuningDataset(gcs_uri=training),
                                           config=config)
        return job_info(job)

    def retrieve(self, job_id: str) -> JobInfo:
        """Return the job's current snapshot (``job_id`` is the full resource name)."""
        with _sdk_errors(f"status {job_id}"):
            return job_info(self.client.tunings.get(name=job_id))

    def list(self, limit: int = 20) -> list[JobInfo]:
        """Return up to ``limit`` jobs of the project and region."""
        out: list[JobInfo] = []
        with _sdk_errors("list jobs"):
            for job in self.client.tunings.list(config={"page_size": limit}):
                out.append(job_info(job))
                if len(out) >= limit:
                    break
        return out

    def events(self, job_id: str, limit: int = 100) -> list[JobEvent]:
        """Return events derived from the job's timestamps, state and error, oldest first."""
        info = self.retrieve(job_id)
        events = []
        if info.created_at is not None:
            events.append(JobEvent(info.created_at, "info", f"job created (base model {info.model})"))
        if info.extra.get("start_time") is not None:
            events.append(JobEvent(info.extra["start_time"], "info", "tuning started"))
        if info.done:
            level = "error" if info.status == "failed" else "info"
            text = f"job {info.status}" + (f": {info.error}" if info.error else "")
            if info.fine_tuned_model:
                text += f"; model {info.fine_tuned_model}"
            events.append(JobEvent(info.finished_at or time.time(), level, text))
        elif info.raw_status:
            events.append(JobEvent(time.time(), "info", f"state {info.raw_status}"))
        return events[-limit:]

    def cancel(self, job_id: str) -> JobInfo:
        """Ask Vertex AI to cancel the job; return its snapshot after the request."""
        with _sdk_errors(f"cancel {job_id}"):
            self.client.tunings.cancel(name=job_id)
        return self.retrieve(job_id)
