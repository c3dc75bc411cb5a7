"""One job handle over both providers: a unified status, events, waiting and cancelling.

    job = Job(backend, "ftjob-abc123")
    job.status().status              # "queued" | "running" | "succeeded" | "failed" | "cancelled" | raw
    for event in job.events(): print(event.message)
    info = job.wait(poll_interval=10, on_update=print)   # returns the final JobInfo

A provider's state that has no unified name (OpenAI ``validating_files`` maps to ``queued``; Vertex
``JOB_STATE_PAUSED`` has none) passes through as the provider's own string, so nothing is hidden.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from deltatune.errors import DeltatuneError

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class HostedError(DeltatuneError):
    """A hosted service refused a request (credentials, quota, a bad argument) or could not be reached."""


@dataclass
class JobInfo:
    """A snapshot of a job; ``status`` is unified where the provider's ``raw_status`` maps, else raw."""

    id: str
    provider: str
    status: str
    raw_status: str
    model: str | None = None
    fine_tuned_model: str | None = None
    created_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    trained_tokens: int | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        """Return True when the job has finished (succeeded, failed or cancelled)."""
        return self.status in TERMINAL

    def summary(self) -> str:
        """Return a one-line description: id, status, model, and the error or result if any."""
        raw = f" ({self.raw_status})" if self.raw_status != self.status else ""
        parts = [f"{self.id}  {self.status}{raw}  base {self.model or '?'}"]
        if self.step is not None:
            parts.append(f"step {self.step}" + (f"/{self.total_steps}" if self.total_steps else ""))
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.fine_tuned_model:
            parts.append(f"-> {self.fine_tuned_model}")
        if self.error:
            parts.append(f"error: {self.error}")
        return "  ".join(parts)


@dataclass
class JobEvent:
    """One event of a job, oldest first; ``step``/``loss`` are set for metrics events."""

    created_at: float
    level: str
    message: str
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None


class Backend(Protocol):
    """What a provider implements: upload, create, retrieve, list, events and cancel."""

    name: str

    def upload(self, path: str) -> str:
        """Upload a prepared JSONL file; return the provider's reference to it (file id or gs:// URI)."""
        ...

    def create(self, *, model: str, training: str, validation: str | None, epochs: int | None,
               lr_multiplier: float | None, batch_size: int | None, suffix: str | None,
               preference: bool = False, beta: float | None = None) -> JobInfo:
        """Start a fine-tuning job (supervised, or with ``preference`` the provider's DPO / preference tuning with
        ``beta``); return its first snapshot."""
        ...

    def retrieve(self, job_id: str) -> JobInfo:
        """Return the job's current snapshot."""
        ...

    def list(self, limit: int) -> list[JobInfo]:
        """Return up to ``limit`` recent jobs, newest first."""
        ...

    def events(self, job_id: str, limit: int) -> list[JobEvent]:
        """Return up to ``limit`` of the job's most recent events, oldest first."""
        ...

    def cancel(self, job_id: str) -> JobInfo:
        """Ask the provider to cancel the job; return its snapshot after the request."""
        ...


def latest_metrics(info: JobInfo, events: list[JobEvent]) -> JobInfo:
    """Return ``info`` with step, total steps and loss filled from the newest metrics event, if any."""
    for event in reversed(events):
        if event.step is not None:
            info.step, info.total_steps = event.step, event.total_steps or info.total_steps
            info.loss = event.loss if event.loss is not None else info.loss
            break
    return info


class Job:
    """A handle on one hosted fine-tuning job."""

    def __init__(self, backend: Backend, job_id: str, warnings: list[str] | None = None) -> None:
        self.backend = backend
        self.id = job_id
        self.warnings = list(warnings or [])  # the data checks' warnings, when this handle came from submit

    def __repr__(self) -> str:
        return f"Job({self.backend.name!r}, {self.id!r})"

    def status(self) -> JobInfo:
        """Return the job's current snapshot (unified status, model, error, result)."""
        return self.backend.retrieve(self.id)

    def events(self, limit: int = 100) -> list[JobEvent]:
        """Return up to ``limit`` of the job's most recent events, oldest first."""
        return self.backend.events(self.id, limit)

    def cancel(self) -> JobInfo:
        """Cancel the job; return its snapshot after the request (often still ``running`` for a moment)."""
        return self.backend.cancel(self.id)

    def wait(self, *, poll_interval: float = 10.0, timeout: float | None = None,
             on_update: Callable[[JobInfo], None] | None = None) -> JobInfo:
        """Poll until the job finishes; return the final JobInfo (check ``.status`` for the outcome).

        ``on_update`` receives every snapshot, with step and loss from the newest metrics event. Raises
        HostedError when ``timeout`` seconds pass first (the job keeps running at the provider).
        """
        start = time.monotonic()
        while True:
            info = latest_metrics(self.status(), self.events(limit=20))
            if on_update is not None:
                on_update(info)
            if info.done:
                return info
            if timeout is not None and time.monotonic() - start > timeout:
                raise HostedError(f"{self.id}: still {info.status} after {timeout:g} s; it keeps running "
                                  f"at {self.backend.name} (`deltatune hosted wait {self.id}` resumes)")
            time.sleep(poll_interval)
