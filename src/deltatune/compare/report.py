"""The comparison's written results: ``report.md`` (verdict + one table) and ``results.json`` (every figure).

    write_report(plan, records, plots)     # -> <out>/report.md
    write_results(plan, records)           # -> <out>/results.json

The best value of each ranked column is **bold** (ties: every tied value): the largest task metric and
tokens/s, the smallest everything else. A failed method is a row saying ``failed: <error>``.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from deltatune.compare.plan import ComparePlan
from deltatune.compare.runner import fmt_seconds
from deltatune.files import write_text_atomic

METRIC_NAMES = {"accuracy": "accuracy", "exact_match": "exact match", "reward_accuracy": "reward accuracy",
                "tool_call_accuracy": "tool-call accuracy"}
ERROR_CELL = 160  # characters of a failure shown in the table (the verdict and results.json have all of it)


def fmt_duration(seconds: float) -> str:
    """Return a duration for the table: ``2.3s`` under a minute, else as fmt_seconds (``3m05s``)."""
    return f"{seconds:.1f}s" if seconds < 59.95 else fmt_seconds(seconds)


def _fmt_lr(r: dict[str, Any]) -> str:
    if r.get("lr") is None:
        return "-"
    return f"{r['lr']:g}" + (f" (head {r['head_lr']:g})" if r.get("head_lr") else "")


def fmt_bytes(n: float) -> str:
    """Return a byte count as ``812 B``, ``4.2 KB``, ``9.82 MB`` or ``1.07 GB`` (powers of 1000)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n / size < 100 else f"{n / size:,.0f} {unit}"
    return f"{n:.0f} B"


@dataclass
class Column:
    """One table column: its header, the number it ranks by, its text, and which end is best."""

    header: str
    value: Callable[[dict[str, Any]], float | None]
    text: Callable[[dict[str, Any]], str]
    best: Literal["min", "max"] | None = None


def _num(key: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: r.get(key)


def _latency(kind: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: (r.get("latency") or {}).get(f"{kind}_ms")


def _opt(fmt: str) -> Callable[[float | None], str]:
    return lambda v: "-" if v is None else fmt.format(v)


def memory_key(records: list[dict[str, Any]]) -> tuple[str, str]:
    """Return (record key, header) of the memory figure: GPU memory when any method ran on CUDA, else RSS."""
    if any(r.get("peak_cuda_mb") for r in records):
        return "peak_cuda_mb", "peak GPU MB"
    return "peak_rss_mb", "peak RSS MB"


def _seconds_per_step(record: dict[str, Any]) -> float | None:
    """Seconds per optimizer step of the step loop (None for a resumed run: its loop trained only the rest)."""
    if record.get("resumed") or not record.get("steps") or record.get("train_seconds") is None:
        return None
    return float(record["train_seconds"]) / int(record["steps"])


def columns(plan: ComparePlan, records: list[dict[str, Any]]) -> list[Column]:
    """Return the report's columns for this plan (its metric) and these records (their device)."""
    mem, mem_header = memory_key(records)
    pct = _opt("{:.1%}")
    cols = [
        Column("lr", _num("lr"), _fmt_lr),
        Column("trainable", _num("trainable_params"), lambda r: _opt("{:,}")(r.get("trainable_params")), "min"),
        Column("%", _num("trainable_pct"), lambda r: _opt("{:.3f}")(r.get("trainable_pct")), "min"),
        Column("delta size", _num("delta_bytes"),
               lambda r: "-" if r.get("delta_bytes") is None else fmt_bytes(r["delta_bytes"]), "min"),
        Column(mem_header, _num(mem), lambda r: _opt("{:,.0f}")(r.get(mem)), "min"),
        Column("tokens/s", _num("tokens_per_s"), lambda r: _opt("{:,.0f}")(r.get("tokens_per_s")), "max"),
        Column("s/step", _seconds_per_step, lambda r: _opt("{:.2f}")(_seconds_per_step(r)), "min"),
        Column("steps", _num("steps"), lambda r: _opt("{}")(r.get("steps"))),
        Column("wall time", _num("wall_seconds"),
               lambda r: "-" if r.get("wall_seconds") is None else fmt_duration(r["wall_seconds"]), "min"),
        Column("eval loss", _num("eval_loss"), lambda r: _opt("{:.4f}")(r.get("eval_loss")), "min"),
    ]
    if plan.metric:
        cols.append(Column(METRIC_NAMES[plan.metric], _num("metric_value"), lambda r: pct(r.get("metric_value")),
                           "max"))
    if plan.metric == "reward_accuracy":  # preference pairs: how far apart the rewards of chosen and rejected are
        cols.append(Column("reward margin", _num("reward_margin"), lambda r: _opt("{:.3f}")(r.get("reward_margin")),
                           "max"))
    cols += [
        Column("latency ms/token", _latency("unmerged"), lambda r: _opt("{:.3g}")(_latency("unmerged")(r)), "min"),
        Column("merged ms/token", _latency("merged"), lambda r: _opt("{:.3g}")(_latency("merged")(r)), "min"),
        Column("can merge", lambda r: None, lambda r: (r.get("latency") or {}).get("can_merge", "-")),
    ]
    return cols


def best_of(records: list[dict[str, Any]], column: Column) -> tuple[float | None, list[str]]:
    """Return the best value of a ranked column over the finished records and the methods that have it
    (every one whose shown value equals the best's); (None, []) for an unranked column or one with fewer
    than two values."""
    finished = [r for r in records if r.get("status") == "finished" and column.value(r) is not None]
    if column.best is None or len(finished) < 2:
        return None, []
    top = (max if column.best == "max" else min)(finished, key=lambda r: column.value(r))
    return column.value(top), [r["method"] for r in finished if column.text(r) == column.text(top)]


def table(plan: ComparePlan, records: list[dict[str, Any]]) -> str:
    """Return the Markdown table: a row per method, the best value of each ranked column in bold."""
    cols = columns(plan, records)
    winners = [best_of(records, c)[1] for c in cols]
    lines = ["| method | " + " | ".join(c.header for c in cols) + " |",
             "| --- | " + " | ".join("---:" if c.best or c.header in ("lr", "steps") else "---" for c in cols) + " |"]
    for r in records:
        if r.get("status") != "finished":
            error = str(r.get("error", "?")).replace("|", "\\|")
            error = error if len(error) <= ERROR_CELL else error[:ERROR_CELL - 3].rstrip() + "..."
            lines.append(f"| {r['method']} | failed: {error} |" + " |" * (len(cols) - 1))
            continue
        cells = [f"**{c.text(r)}**" if r["method"] in won else c.text(r) for c, won in zip(cols, winners, strict=True)]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(plan: ComparePlan, records: list[dict[str, Any]]) -> list[str]:
    """Return the verdict lines: the best method per criterion, then the failures."""
    by_header = {c.header: c for c in columns(plan, records)}
    mem_header = memory_key(records)[1]
    finished = [r for r in records if r.get("status") == "finished"]
    lines = []

    def line(label: str, column: Column | None, show: Callable[[dict[str, Any]], str]) -> None:
        if column is None:
            return
        _, names = best_of(records, column)
        having = [r for r in finished if column.value(r) is not None]
        if len(having) == 1:  # one method has the figure (one finished, or the others lack it): it is the best
            names = [having[0]["method"]]
        if names:
            first = next(r for r in finished if r["method"] == names[0])
            lines.append(f"- {label}: {' and '.join(names)} ({show(first)})")

    metric = METRIC_NAMES.get(plan.metric or "")
    if metric:
        line(f"best {metric}", by_header[metric], lambda r: f"{r['metric_value']:.1%}")
    line("lowest eval loss", by_header["eval loss"], lambda r: f"{r['eval_loss']:.4f}")
    line("fewest trainable parameters", by_header["trainable"],
         lambda r: f"{r['trainable_params']:,}, {r['trainable_pct']:.3f}%")
    line("smallest delta", by_header["delta size"], lambda r: fmt_bytes(r["delta_bytes"]))
    line("fastest training", by_header["tokens/s"], lambda r: f"{r['tokens_per_s']:,.0f} tokens/s")
    line("least memory", by_header[mem_header], lambda r: f"{by_header[mem_header].value(r):,.0f} MB")
    fastest = Column("inference", _fastest_latency, lambda r: f"{_fastest_latency(r):.3g}", "min")
    unit = next(((r.get("latency") or {}).get("unit") for r in finished), "ms per token")
    line("fastest inference", fastest, lambda r: f"{_fastest_latency(r):.3g} {unit}"
         + (" merged" if (r.get("latency") or {}).get("merged_ms") == _fastest_latency(r) else ""))
    failed = [r for r in records if r.get("status") != "finished"]
    if failed:
        lines.append("- failed: " + "; ".join(f"{r['method']} ({r.get('error', '?')})" for r in failed))
    return lines


def _fastest_latency(r: dict[str, Any]) -> float | None:
    """The lower of a record's unmerged and merged latency."""
    lat = r.get("latency") or {}
    values = [v for v in (lat.get("unmerged_ms"), lat.get("merged_ms")) if v is not None]
    return min(values) if values else None


def _budget(run: dict[str, Any]) -> str:
    steps = f"{run['max_steps']} steps" if run.get("max_steps") else f"{run['epochs']:g} epoch(s) " \
        f"(about {run['planned_steps']} steps)"
    time_cap = f", at most {run['max_seconds']:g} s of training per method" if run.get("max_seconds") else ""
    return f"{steps} of {run['batch_size']} x {run['grad_accum']} examples{time_cap}"


def notes(plan: ComparePlan, records: list[dict[str, Any]]) -> list[str]:
    """Return the lines that say what was run and what each column means."""
    run = plan.describe()
    finished = [r for r in records if r.get("status") == "finished"]
    mem_header = memory_key(records)[1]
    unit = next(((r.get("latency") or {}).get("unit") for r in finished), "ms per token")
    eval_text = f"eval {run['data_eval']}: {run['eval_examples']} examples" if run["eval_examples"] else "no eval data"
    lines = [
        f"- model: `{run['model']}` ({run['task']}); data: `{run['data_train']}` ({run['train_examples']} training "
        f"examples; {eval_text}), max length {run['max_length']}"
        + (f", batching {run['batching']}" if run["task"] == "causal_lm" else ""),
        f"- budget: {_budget(run)}; seed {run['seed']}. Every method trained on the same examples in the same "
        "order (same data, seed and batch plan).",
        "- lr: the peak learning rate, the method's recommended rate (README, methods) unless `train.lr` or "
        "`compare.overrides.<method>.train.lr` set one"
        + ("; head: the rate of the fresh classification head (`train.head_lr`, else the rule in README, methods)"
           if plan.task == "classification" else "") + ".",
        f"- {mem_header}: " + ("`torch.cuda.max_memory_allocated` of the training process."
                               if mem_header.startswith("peak GPU") else
                               "peak resident set size of the training process (includes the process itself: "
                               "torch, the tokenizer, the model)."),
        "- tokens/s: non-padding tokens per second of the step loop; s/step: seconds per optimizer step of the "
        "step loop (evaluations excluded); wall time: the whole training run (loading, evaluations, steps, saving).",
        f"- latency: {unit}, median of {plan.settings.latency_repeats} runs after a warm-up"
        + (f" (greedy generation of {plan.settings.latency_tokens} tokens with the KV cache, prompt prefill included)"
           if plan.task == "causal_lm" else " (one forward of a batch of eval inputs)")
        + "; merged: after folding the delta into the weights (`can merge` n/a: the delta is plain weights).",
    ]
    if plan.metric is None:
        lines.append("- no task metric: the eval data has no reference replies, so eval loss is the quality "
                     "criterion.")
    planned = {item.key: item.planned_steps for item in plan.methods}
    stopped = [f"{r['method']} ({r['steps']} of {planned[r['method']]})" for r in finished
               if r["config"]["train"].get("max_seconds") and r["steps"] < planned.get(r["method"], 0)]
    if stopped:
        lines.append(f"- stopped by the time budget before the planned steps: {', '.join(stopped)}.")
    resumed = [r["method"] for r in finished if r.get("resumed")]
    if resumed:
        lines.append(f"- resumed after an interruption: {', '.join(resumed)} (tokens/s, peak memory and wall time "
                     "cover the part after the resume; `--fresh` trains again from the start).")
    lines += [f"- note: {n}" for n in plan.notes]
    return lines


def write_report(plan: ComparePlan, records: list[dict[str, Any]], plots: list[Path]) -> Path:
    """Write ``<out>/report.md`` (verdict, table, notes, the plots); return its path."""
    title = f"# deltatune compare: {len(records)} methods on `{plan.describe().get('model')}`"
    parts = [title, "", *verdict(plan, records), "", table(plan, records), "", *notes(plan, records)]
    if plots:
        parts += ["", *[f"![{p.stem}]({p.name})" for p in plots]]
    path = plan.out / "report.md"
    write_text_atomic(path, "\n".join(parts) + "\n")
    return path


def versions() -> dict[str, str]:
    """Return the versions of deltatune, python, torch and transformers."""
    import torch
    import transformers

    import deltatune

    return {"deltatune": deltatune.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def write_results(plan: ComparePlan, records: list[dict[str, Any]]) -> Path:
    """Write ``<out>/results.json``: every figure of every method with its resolved config, the shared run
    settings, versions and the date; return its path."""
    data = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        "source": plan.source,
        "out": str(plan.out),
        "run": plan.describe(),
        "settings": plan.settings.model_dump(mode="json"),
        "notes": plan.notes,
        "methods": records,
    }
    path = plan.out / "results.json"
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")
    return path
