"""One method of a comparison, in its own process: train, measure, write ``<method>/compare.json``.

The parent (runner.py) starts ``python -m deltatune.compare.child`` and writes a JSON request to its
stdin: ``{"config": <resolved run config>, "resume": bool, "error_file": path, "latency_tokens": int,
"latency_repeats": int}``. Exit codes: 0 done (compare.json written), 130 interrupted (Ctrl-C: training
wrote a checkpoint), 2 a user error, 1 anything else; on an error its one-line summary goes to ``error_file``.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from deltatune.config import RunConfig

RESULT_FILE = "compare.json"


def delta_bytes(folder: Path) -> int:
    """Return the size on disk of a delta: ``adapter_model.safetensors`` plus ``adapter_config.json``."""
    from deltatune.delta import CONFIG_FILE, WEIGHTS_FILE

    return sum((folder / name).stat().st_size for name in (WEIGHTS_FILE, CONFIG_FILE))


def eval_curve(folder: Path) -> list[list[float]]:
    """Return ``[[step, eval_loss], ...]`` from the run's ``metrics.jsonl``, one point per step (the last
    logged: a run stopped by its time budget on an eval step logs that step twice)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    curve: dict[int, float] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if "eval_loss" in record:
            curve[record["step"]] = record["eval_loss"]
    return [[step, loss] for step, loss in curve.items()]


def task_metric(task: str, eval_end: dict[str, float], generation_end: dict[str, Any]) -> tuple[str | None, Any]:
    """Return (metric name, value): reward accuracy on held-out preference pairs, accuracy for classifiers, exact
    match when replies were compared with references, else (None, None)."""
    if "eval_reward_accuracy" in eval_end:
        return "reward_accuracy", eval_end["eval_reward_accuracy"]
    if "tool_call_accuracy" in generation_end:
        return "tool_call_accuracy", generation_end["tool_call_accuracy"]
    if task == "classification":
        return "accuracy", eval_end.get("eval_accuracy")
    if generation_end.get("n"):
        return "exact_match", generation_end["exact_match"]
    return None, None


def latency_inputs(cfg: RunConfig) -> Any:
    """Return the fixed latency inputs of a run: the first eval (else train) example's prompt for a causal
    LM, the first eight examples' texts for a classifier."""
    from deltatune.compare.measure import LatencyInputs
    from deltatune.evaluate import reference_pairs
    from deltatune.training.setup import load_run_data

    data = load_run_data(cfg, Path(cfg.output.dir))
    examples = data.eval or data.train
    if data.task == "classification":
        return LatencyInputs(texts=[(ex.text or "", ex.text_pair) for ex in examples[:8]])
    if data.pairs:  # the first pair's prompt
        return LatencyInputs(messages=[{"role": m.role, "content": m.content} for m in examples[0].messages or []])
    pairs = reference_pairs(examples)
    return LatencyInputs(messages=pairs[0][0] if pairs else None)


def run(cfg: RunConfig, *, resume: bool, latency_tokens: int, latency_repeats: int) -> dict[str, Any]:
    """Train ``cfg`` (resuming from its newest checkpoint with ``resume``), measure the delta, and return the
    figures that compare.json holds."""
    from deltatune.compare.measure import measure_latency, peak_memory_mb
    from deltatune.delta import load_delta
    from deltatune.training.loop import train
    from deltatune.training.optim import peak_learning_rates

    started = time.perf_counter()
    result = train(cfg, resume=resume, progress=False)
    memory = peak_memory_mb()  # before the delta is loaded again for the latency runs
    out = result.output_dir
    delta = load_delta(out, device=cfg.model.device, dtype=cfg.model.dtype)
    task = delta.info.task
    metric, value = task_metric(task, result.eval_end, result.generation_end)
    lr, head_lr = peak_learning_rates(cfg.train, cfg.method, task)
    print("measuring inference latency", flush=True)
    latency = measure_latency(delta, latency_inputs(cfg), max_length=cfg.data.max_length,
                              new_tokens=latency_tokens, repeats=latency_repeats)
    generation = {k: v for k, v in result.generation_end.items() if k != "samples"}
    return {
        "status": "finished",
        "task": task,
        "lr": lr,
        "head_lr": head_lr if task == "classification" else None,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "trainable_pct": 100 * result.trainable_params / max(result.total_params, 1),
        "delta_bytes": delta_bytes(out),
        "reward_margin": result.eval_end.get("eval_reward_margin"),
        "peak_rss_mb": memory["rss_mb"],
        "peak_cuda_mb": memory["cuda_mb"],
        "steps": result.steps,
        "train_tokens": result.train_tokens,
        "train_seconds": result.train_seconds,
        "tokens_per_s": result.train_tokens / result.train_seconds if result.train_tokens else None,
        "wall_seconds": result.seconds,
        "method_seconds": time.perf_counter() - started,
        "resumed": resume,
        "eval_start": result.eval_start,
        "eval_end": result.eval_end,
        "eval_loss": result.eval_end.get("eval_loss"),
        "exact_match": generation or None,
        "metric": metric,
        "metric_value": value,
        "eval_curve": eval_curve(out),
        "latency": latency,
        "device": str(delta.loaded.device),
        "config": json.loads(cfg.model_dump_json()),
    }


def main() -> int:
    """Read the request from stdin, run it, write compare.json; return the exit code (see the module doc)."""
    from deltatune.config import config_from_dict
    from deltatune.errors import DeltatuneError
    from deltatune.files import write_text_atomic
    from deltatune.training.signals import Interrupted

    request = json.loads(sys.stdin.read())
    error_file = Path(request["error_file"])
    try:
        cfg = config_from_dict(request["config"], "compare")
        record = run(cfg, resume=request["resume"], latency_tokens=request["latency_tokens"],
                     latency_repeats=request["latency_repeats"])
        record["method"] = request["key"]
        write_text_atomic(Path(cfg.output.dir) / RESULT_FILE, json.dumps(record, indent=1) + "\n")
    except (Interrupted, KeyboardInterrupt) as err:
        print(f"deltatune: {err or 'interrupted'}", file=sys.stderr, flush=True)
        return 130
    except DeltatuneError as err:
        print(f"deltatune: {err}", file=sys.stderr, flush=True)
        error_file.write_text(" ".join(str(err).split()))
        return 2
    except Exception as err:
        traceback.print_exc()
        first = (str(err).strip().splitlines() or [""])[0]
        error_file.write_text(f"{type(err).__name__}: {first}".rstrip(": "))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
