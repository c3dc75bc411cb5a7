"""Hosted fine-tuning: the same data files, trained by OpenAI or Vertex AI (Gemini).

    from deltatune import hosted

    report = hosted.prepare("train.jsonl", "vertex", out="train.vertex.jsonl")   # convert + check
    print(*hosted.estimate("train.jsonl", "openai", "gpt-4o-mini-2024-07-18").lines(), sep="\\n")
    job = hosted.submit("train.jsonl", "openai", "gpt-4o-mini-2024-07-18", epochs=3, suffix="dates")
    info = job.wait(on_update=lambda i: print(i.summary()))       # info.status == "succeeded"
    hosted.job("ftjob-abc123").cancel()

Every data format deltatune reads converts (see :mod:`deltatune.hosted.convert`); the file is checked
the way the provider checks it before anything is uploaded, so a malformed file never leaves the
machine. Provider options (keyword arguments of :func:`backend`): ``base_url``, ``max_retries``; for
Vertex also ``project``, ``location``, ``staging`` (gs:// folder for the upload), ``storage_url``,
``credentials``, ``retry_delay``. Credentials come from the SDKs' usual sources (``OPENAI_API_KEY``;
Google Application Default Credentials) and are never printed.

OpenAI has announced that self-serve fine-tuning job creation ends for all organisations on 2027-01-06.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from deltatune.errors import DataError
from deltatune.hosted.convert import PROVIDERS, convert, to_openai, to_vertex
from deltatune.hosted.jobs import STATUSES, Backend, HostedError, Job, JobEvent, JobInfo
from deltatune.hosted.openai_backend import OPENAI_SUNSET_DATE, OPENAI_SUNSET_NOTICE
from deltatune.hosted.tokens import Estimate, default_epochs, token_counter
from deltatune.hosted.validate import Report, check, check_examples, read_examples

_OPENAI_OPTIONS = {"base_url", "max_retries"}


def provider_of(job_id: str) -> str:
    """Return the provider a job id belongs to: Vertex names start with ``projects/``, OpenAI ids don't."""
    return "vertex" if job_id.startswith("projects/") else "openai"


def backend(provider: str, **options: Any) -> Backend:
    """Return the provider's backend; unset options (None) are left to the SDK's defaults."""
    options = {k: v for k, v in options.items() if v is not None}
    sdk = {"openai": "openai", "vertex": "google.genai"}.get(provider)
    if sdk is not None:
        try:
            __import__(sdk)
        except ImportError:
            raise HostedError(f"{provider}: the `{sdk}` SDK is not installed; pip install 'deltatune[hosted]'"
                              ) from None
    if provider == "openai":
        from deltatune.hosted.openai_backend import OpenAIBackend

        return OpenAIBackend(**{k: v for k, v in options.items() if k in _OPENAI_OPTIONS})
    if provider == "vertex":
        from deltatune.hosted.vertex_backend import VertexBackend

        return VertexBackend(**options)
    raise HostedError(f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}")


def write_jsonl(rows: list[dict[str, Any]], out: str | Path) -> Path:
    """Write rows as JSON lines atomically (a temporary file, then rename); return the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def prepare(data: str, provider: str, out: str | Path | None = None, *, model: str | None = None,
            fmt: str = "auto", system_prompt: str | None = None, role: str = "training") -> Report:
    """Convert and check a data file for ``provider``; write ``out`` when there are no errors.

    Returns the Report (errors and warnings); the file is written only when ``report.ok``.
    """
    report = check(data, provider, model=model, fmt=fmt, system_prompt=system_prompt, role=role)
    if out is not None and report.ok:
        write_jsonl(report.rows, out)
    return report


def estimate(data: str, provider: str, model: str, *, epochs: int | None = None,
             price_per_million: float | None = None, fmt: str = "auto",
             system_prompt: str | None = None) -> Estimate:
    """Return token counts, default epochs, billed tokens and (given a price per 1M tokens) the price.

    Raises DataError listing the problems when the data does not convert.
    """
    from deltatune.hosted.tokens import estimate as _estimate

    examples, errors = read_examples(data, fmt, system_prompt=system_prompt)
    if errors:
        Report(provider, errors=errors).raise_for_errors(data)
    return _estimate(examples, provider, model, epochs=epochs, price_per_million=price_per_million)


def _prepared_file(data: str, provider: str, model: str, fmt: str, system_prompt: str | None,
                   role: str, folder: str) -> tuple[str, Report]:
    out = Path(folder) / f"{Path(data).stem}.{provider}.jsonl"
    report = prepare(data, provider, out, model=model, fmt=fmt, system_prompt=system_prompt, role=role)
    report.raise_for_errors(data)
    return str(out), report


def submit(data: str, provider: str, model: str, *, validation: str | None = None, epochs: int | None = None,
           lr_multiplier: float | None = None, batch_size: int | None = None, suffix: str | None = None,
           fmt: str = "auto", system_prompt: str | None = None, beta: float | None = None, **options: Any) -> Job:
    """Check, convert, upload and start a fine-tuning job; return its Job handle (``.warnings`` set).

    The data (and ``validation``) are checked first: on any error DataError is raised and nothing is
    uploaded. Preference pairs start the provider's preference job (OpenAI DPO, Vertex AI preference tuning) with
    ``beta`` (None: the provider's default). ``options`` go to :func:`backend`. Raises HostedError when the
    provider refuses.
    """
    if provider not in PROVIDERS:
        raise HostedError(f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}")
    with tempfile.TemporaryDirectory(prefix="deltatune-hosted-") as folder:
        train_path, report = _prepared_file(data, provider, model, fmt, system_prompt, "training", folder)
        warnings = list(report.warnings)
        valid_path = None
        if validation is not None:
            if Path(validation).stem == Path(data).stem:
                raise DataError(f"{validation}: give the validation file a different name from the training "
                                "file")
            valid_path, valid_report = _prepared_file(validation, provider, model, fmt, system_prompt,
                                                      "validation", folder)
            warnings += [f"{validation}: {w}" for w in valid_report.warnings]
        client = backend(provider, **options)
        training = client.upload(train_path)
        valid_ref = client.upload(valid_path) if valid_path else None
        preference = bool(report.examples) and report.examples[0].is_pair
        if beta is not None and not preference:
            raise DataError(f"{data}: beta applies to preference data (prompt/chosen/rejected); this file is "
                            "supervised")
        info = client.create(model=model, training=training, validation=valid_ref, epochs=epochs,
                             lr_multiplier=lr_multiplier, batch_size=batch_size, suffix=suffix,
                             **({"preference": True, "beta": beta} if preference else {}))
    return Job(client, info.id, warnings)


def job(job_id: str, provider: str | None = None, **options: Any) -> Job:
    """Return a handle on an existing job (the provider is told from the id unless given)."""
    return Job(backend(provider or provider_of(job_id), **options), job_id)


def list_jobs(provider: str, limit: int = 20, **options: Any) -> list[JobInfo]:
    """Return up to ``limit`` recent jobs of ``provider``."""
    return backend(provider, **options).list(limit)


__all__ = [
    "OPENAI_SUNSET_DATE",
    "OPENAI_SUNSET_NOTICE",
    "PROVIDERS",
    "STATUSES",
    "Estimate",
    "HostedError",
    "Job",
    "JobEvent",
    "JobInfo",
    "Report",
    "backend",
    "check",
    "check_examples",
    "convert",
    "default_epochs",
    "estimate",
    "job",
    "list_jobs",
    "prepare",
    "provider_of",
    "submit",
    "to_openai",
    "to_vertex",
    "token_counter",
    "write_jsonl",
]
