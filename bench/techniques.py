"""Each speed technique's effect: bench/speed.py's work, deltatune with its defaults and then with one technique
switched off at a time, in the same run.

    .venv/bin/python bench/techniques.py               # 6 steps per variant, about 5 minutes on 2 CPU cores
    .venv/bin/python bench/techniques.py --steps 3     # quicker

The work is bench/speed.py's (SmolLM2-135M-Instruct, alpaca, chat template, response-only loss, max_length
512, LoRA r 16 alpha 32 all-linear, 8 examples per step, AdamW 2e-4 constant, float32, the same examples in the
same order for every variant: speed.py's plan). The variants, each in its own process:

- ``defaults``: what a user gets.
- ``train.packed_attention=false``: packed rows under a (T, T) block-diagonal mask instead of causal sdpa per
  example (compute/attention.py).
- ``train.fused_modules=false``: the model's own RMSNorm and SwiGLU modules instead of the fused autograd
  functions (training/fused.py).
- ``train.chunked_loss=false``: the output layer at the supervised positions, then the loss, instead of the
  chunked output layer + cross-entropy (compute/chunked_ce.py).
- ``train.pass_tokens=null``: each step's 8 examples as one packed row instead of rows of at most 640 tokens;
  and the same with the block-diagonal mask (attention's share grows with the row: the mask's cost shows there).

Printed: useful tokens/s (steps 2..N), seconds per step, peak resident memory, the loss at the last step and
each variant's tokens/s and memory relative to the defaults; also written to runs/bench-techniques/results.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import speed  # bench/speed.py: the work, the children, the figures

VARIANTS = {
    "defaults": [],
    "per-example attention off": ["train.packed_attention=false"],
    "fused RMSNorm/SwiGLU off": ["train.fused_modules=false"],
    "chunked output layer + loss off": ["train.chunked_loss=false"],
    "one row per step (pass_tokens off)": ["train.pass_tokens=null"],
    "one row per step + block mask": ["train.pass_tokens=null", "train.packed_attention=false"],
}


def main(argv: list[str] | None = None) -> None:
    """Run every variant on the same work and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per variant (tokens/s over 2..N)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, among the names above")
    opts = p.parse_args(argv)
    names = [n.strip() for n in opts.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant {unknown[0]!r}; choose among: {', '.join(VARIANTS)}")
    speed_opts = speed.parser("cpu").parse_args(["--steps", str(opts.steps)])
    out = speed.ROOT / "runs" / "bench-techniques"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    inputs = speed.resolve_inputs(speed_opts, "cpu", out)
    base = {**inputs, "device": "cpu", "dtype": "float32", "threads": speed_opts.threads}
    spec = {**base, "max_length": 512, "steps": opts.steps, "max_examples": speed.BATCH * (opts.steps + 1),
            "work": str(out / "work.json")}
    while speed.prepare_work({**spec, "out": str(out / "work")}) is None:  # long examples dropped: read more
        if spec["max_examples"] > 100 * speed.BATCH * opts.steps:
            sys.exit(f"{spec['data']}: too few examples of at most 512 tokens for {opts.steps} steps")
        spec["max_examples"] += speed.BATCH
    print(f"# bench/techniques.py: {inputs['model']}, {opts.steps} steps of {speed.BATCH} examples, max_length 512, "
          f"LoRA r {speed.RANK} all-linear, float32, {speed_opts.threads} threads\n")
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        tag = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
        raw = speed.run_child("deltatune", {**spec, "name": "deltatune", "tag": tag, "deltatune": VARIANTS[name],
                                            "out": str(out / "run")}, out / "logs")
        if raw is not None:
            rows[name] = {**speed.summarize(raw), "same_examples": raw["same_examples"]}
    ref = rows.get("defaults")
    print(f"| variant | settings | useful tok/s | s/step | peak RSS GB | loss step {opts.steps} | tok/s vs defaults | "
          "memory vs defaults | same examples |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, s in rows.items():
        speedup = f"{s['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        memory = f"{s['peak_rss_gb'] / ref['peak_rss_gb']:.2f}x" if ref else "-"
        same = {True: "yes", False: "NO", None: "unchecked"}[s["same_examples"]]
        print(f"| {name} | {' '.join(VARIANTS[name]) or '-'} | {s['tokens_per_s']:.1f} | {s['s_per_step']:.1f} | "
              f"{s['peak_rss_gb']:.2f} | {s['loss_last']:.4f} | {speedup} | {memory} | {same} |")
    (out / "results.json").write_text(json.dumps({"steps": opts.steps, "model": inputs["model"],
                                                  "variants": rows}, indent=1))
    print(f"\n(total {time.perf_counter() - started:.0f} s; figures in {out / 'results.json'})")


if __name__ == "__main__":
    main()
