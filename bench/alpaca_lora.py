"""LoRA on the bundled SmolLM2-135M-Instruct, 100 steps of ../shared/data/alpaca_en_demo.json.

Prints eval loss at the start and the end, wall time and throughput. Run from the project root:

    .venv/bin/python bench/alpaca_lora.py [key=value ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from deltatune.config import load_config
from deltatune.models import load_model
from deltatune.training.loop import train

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpaca_en_demo.json"


def main(overrides: list[str]) -> None:
    """Run the benchmark and print its figures as one JSON line at the end."""
    if not DATA.is_file():
        sys.exit(f"{DATA} not found: this benchmark reads the reference data beside the project")
    t0 = time.perf_counter()
    load_model(load_config(None).model)  # converts and caches the bundled model if needed
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_model(load_config(None).model)
    warm = time.perf_counter() - t0
    cfg = load_config(None, [f"data.train={DATA}", "data.eval=0.1", "data.max_length=512",
                             "method.r=16", "method.alpha=32", "train.max_steps=100", "train.batch_size=4",
                             "train.lr=2e-4", "train.warmup=0.1", "output.dir=runs/bench-alpaca-lora",
                             "output.overwrite=true", *overrides])
    result = train(cfg, progress=sys.stderr.isatty())
    metrics = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "tokens_per_s" in m]
    print(json.dumps({
        "model_load_s_first": round(cold, 2), "model_load_s_cached": round(warm, 2),
        "eval_loss_start": round(result.eval_start["eval_loss"], 4),
        "eval_loss_end": round(result.eval_end["eval_loss"], 4),
        "steps": result.steps, "wall_s": round(result.seconds, 1),
        "train_tokens_per_s": round(steps[-1]["tokens_per_s"], 1) if steps else None,
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
