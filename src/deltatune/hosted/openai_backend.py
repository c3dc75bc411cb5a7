"""OpenAI fine-tuning through the official `openai` SDK: files, fine_tuning.jobs, events, checkpoints.

    backend = OpenAIBackend(base_url=None)     # the SDK reads OPENAI_API_KEY (and OPENAI_BASE_URL)
    file_id = backend.upload("train.openai.jsonl")
    info = backend.create(model="gpt-4o-mini-2024-07-18", training=file_id, validation=None, epochs=None,
                          lr_multiplier=None, batch_size=None, suffix="dates")

The API key is read by the SDK from ``OPENAI_API_KEY`` and never printed or logged: error messages
are built from the status code and the provider's message, with the key masked should it appear.
Retries on 408/409/429/5xx are the SDK's own (``max_retries``, honouring ``Retry-After``).

OpenAI has announced that self-serve creation of fine-tuning jobs ends for all organisations on
2027-01-06 (see :data:`OPENAI_SUNSET_NOTICE`); listing and reading existing jobs is unaffected here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deltatune.hosted.jobs import HostedError, JobEvent, JobInfo

OPENAI_SUNSET_DATE = "2027-01-06"
OPENAI_SUNSET_NOTICE = (f"notice: OpenAI has announced that self-serve fine-tuning job creation ends for all "
                        f"organisations on {OPENAI_SUNSET_DATE}; after that date `hosted submit --provider "
                        "openai` will be refused by OpenAI")
STATUS = {"validating_files": "queued", "queued": "queued", "running": "running", "succeeded": "succeeded",
          "failed": "failed", "cancelled": "cancelled"}


def _mask(text: str) -> str:
    key = os.environ.get("OPENAI_API_KEY")
    return text.replace(key, "***") if key and len(key) >= 4 else text


@contextmanager
def _sdk_errors(action: str) -> Iterator[None]:
    """Turn the SDK's exceptions into HostedError with a short message and no credentials."""
    import openai

    try:
        yield
    except openai.AuthenticationError as err:
        raise HostedError(f"openai: {action}: authentication failed (HTTP 401); set OPENAI_API_KEY to a valid "
                          f"key for this organisation/project ({_mask(_message(err))})") from None
    except openai.PermissionDeniedError as err:
        raise HostedError(f"openai: {action}: permission denied (HTTP 403): {_mask(_message(err))}") from None
    except openai.RateLimitError as err:
        raise HostedError(f"openai: {action}: rate limited or out of quota (HTTP 429) after retries: "
                          f"{_mask(_message(err))}; wait and try again, or check billing") from None
    except openai.NotFoundError as err:
        raise HostedError(f"openai: {action}: not found (HTTP 404): {_mask(_message(err))}") from None
    except openai.APIStatusError as err:
        kind = "server error" if err.status_code >= 500 else "request refused"
        raise HostedError(f"openai: {action}: {kind} (HTTP {err.status_code}): {_mask(_message(err))}"
                          + ("; the service may be down, try again later" if err.status_code >= 500 else "")
                          ) from None
    except openai.APIConnectionError as err:
        raise HostedError(f"openai: {action}: cannot reach the API ({_mask(str(err))}); check the network "
                          "and --base-url / OPENAI_BASE_URL") from None
    except openai.OpenAIError as err:  # e.g. no OPENAI_API_KEY at client construction
        raise HostedError(f"openai: {action}: {_mask(str(err))}") from None


def _message(err: Any) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(err, "message", err))


def job_info(job: Any) -> JobInfo:
    """Return a JobInfo from the SDK's FineTuningJob object."""
    error = None
    if getattr(job, "error", None) is not None and (job.error.message or job.error.code):
        error = f"{job.error.code}: {job.error.message}" if job.error.code else job.error.message
    return JobInfo(id=job.id, provider="openai", status=STATUS.get(job.status, job.status), raw_status=job.status,
                   model=job.model, fine_tuned_model=job.fine_tuned_model, created_at=job.created_at,
                   finished_at=job.finished_at, error=error, trained_tokens=job.trained_tokens,
                   extra={"training_file": job.training_file, "result_files": list(job.result_files or [])})


def job_event(event: Any) -> JobEvent:
    """Return a JobEvent from the SDK's FineTuningJobEvent (metrics events carry step and loss)."""
    data = event.data if isinstance(event.data, dict) else {}
    step = data.get("step")
    loss = data.get("train_loss")
    return JobEvent(created_at=event.created_at, level=event.level, message=event.message,
                    step=int(step) if isinstance(step, (int, float)) else None,
                    total_steps=data.get("total_steps"), loss=float(loss) if loss is not None else None)


class OpenAIBackend:
    """OpenAI's fine-tuning API through the official SDK."""

    name = "openai"

    def __init__(self, *, base_url: str | None = None, max_retries: int = 3, timeout: float = 60.0) -> None:
        with _sdk_errors("connect"):
            import openai

            kwargs: dict[str, Any] = {"max_retries": max_retries, "timeout": timeout}
            if base_url:
                kwargs["base_url"] = base_url
            self.client = openai.OpenAI(**kwargs)

    def upload(self, path: str) -> str:
        """Upload a JSONL file with purpose ``fine-tune``; return its file id."""
        with _sdk_errors(f"upload {path}"), Path(path).open("rb") as handle:
            return self.client.files.create(file=(Path(path).name, handle), purpose="fine-tune").id

    def create(self, *, model: str, training: str, validation: str | None = None, epochs: int | None = None,
               lr_multiplier: float | None = None, batch_size: int | None = None,
               suffix: str | None = None, preference: bool = False, beta: float | None = None) -> JobInfo:
        """Create a supervised job, or with ``preference`` a DPO job (``beta`` among its hyperparameters), the
        hyperparameters under ``method``; return its first snapshot."""
        hyper: dict[str, Any] = {}
        if epochs is not None:
            hyper["n_epochs"] = epochs
        if lr_multiplier is not None:
            hyper["learning_rate_multiplier"] = lr_multiplier
        if batch_size is not None:
            hyper["batch_size"] = batch_size
        if preference and beta is not None:
            hyper["beta"] = beta
        kind = "dpo" if preference else "supervised"
        kwargs: dict[str, Any] = {"model": model, "training_file": training,
                                  "method": {"type": kind, kind: {"hyperparameters": hyper}}}
        if validation:
            kwargs["validation_file"] = validation
        if suffix:
            kwargs["suffix"] = suffix
        with _sdk_errors("create job"):
            return job_info(self.client.fine_tuning.jobs.create(**kwargs))

    def retrieve(self, job_id: str) -> JobInfo:
        """Return the job's current snapshot."""
        with _sdk_errors(f"status {job_id}"):
            return job_info(self.client.fine_tuning.jobs.retrieve(job_id))

    def list(self, limit: int = 20) -> list[JobInfo]:
        """Return up to ``limit`` recent jobs, newest first (one page)."""
        with _sdk_errors("list jobs"):
            return [job_info(j) for j in self.client.fine_tuning.jobs.list(limit=limit).data]

    def events(self, job_id: str, limit: int = 100) -> list[JobEvent]:
        """Return up to ``limit`` most recent events, oldest first (the API pages newest first)."""
        with _sdk_errors(f"events {job_id}"):
            page = self.client.fine_tuning.jobs.list_events(job_id, limit=limit)
            return [job_event(e) for e in reversed(page.data)]

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """Return the job's checkpoints: step, model name and metrics of each, newest first."""
        with _sdk_errors(f"checkpoints {job_id}"):
            page = self.client.fine_tuning.jobs.checkpoints.list(job_id)
            return [{"step": c.step_number, "model": c.fine_tuned_model_checkpoint,
                     "metrics": c.metrics.model_dump(exclude_none=True)} for c in page.data]

    def cancel(self, job_id: str) -> JobInfo:
        """Cancel the job; return its snapshot after the request."""
        with _sdk_errors(f"cancel {job_id}"):
            return job_info(self.client.fine_tuning.jobs.cancel(job_id))
