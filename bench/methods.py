"""Every method on the same short budget, on SmolLM2 (alpaca) and MiniLM (SST-2): the issue-3 table.

Each method runs in its own subprocess so its peak memory is its own. Prints a Markdown table and
writes the figures to ``runs/bench-methods/results.json``. From the project root:

    .venv/bin/python bench/methods.py                 # both models, every method
    .venv/bin/python bench/methods.py --model minilm --methods lora,bitfit
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OUT = Path("runs/bench-methods")

# each method's section; train.lr is left unset, so every method trains at its documented default rate
# (the README's methods table: MethodConfig.recommended_lr), as `deltatune compare` does
METHODS: dict[str, dict] = {
    "full": {"name": "full"},
    "freeze": {"name": "freeze", "layers": 2},
    "bitfit": {"name": "bitfit"},
    "diff_pruning": {"name": "diff_pruning"},
    "pafi": {"name": "pafi"},
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": 20},
    "p_tuning": {"name": "p_tuning", "num_virtual_tokens": 20},
    "prefix_tuning": {"name": "prefix_tuning", "num_virtual_tokens": 20},
    "adapter": {"name": "adapter", "variant": "houlsby"},
    "ia3": {"name": "ia3"},
    "hiwi": {"name": "hiwi"},
    "lora": {"name": "lora", "r": 8, "alpha": 16},
    "dora": {"name": "lora", "r": 8, "alpha": 16, "use_dora": True},
}

BUDGETS = {
    "smollm2": [f"data.train={DATA / 'alpaca_en_demo.json'}", "data.max_examples=300", "data.eval=0.1",
                "data.max_length=256", "train.max_steps=30", "train.batch_size=4"],
    "minilm": ["model.name=minilm", f"data.train={DATA / 'sst2_train_20k.tsv'}", f"data.eval={DATA / 'sst2_dev.tsv'}",
               "data.max_examples=1600", "data.max_length=128", "train.epochs=1", "train.batch_size=32"],
}


def run_one(model: str, method: str) -> dict:
    """Train one method in this process; return its figures."""
    from deltatune.config import config_from_dict, load_config
    from deltatune.training.loop import train

    section = METHODS[method]
    base = load_config(None, [*BUDGETS[model], "train.warmup=0.1",
                              f"output.dir={OUT / model / method}", "output.overwrite=true"])
    tree = json.loads(base.model_dump_json())
    tree["method"] = section
    cfg = config_from_dict(tree)
    result = train(cfg, progress=False)
    delta = result.output_dir / "adapter_model.safetensors"
    return {
        "model": model, "method": method,
        "lr": cfg.method.default_lr("classification" if model == "minilm" else "causal_lm"),
        "trainable": result.trainable_params, "total": result.total_params,
        "delta_mb": delta.stat().st_size / 1e6,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "s_per_step": result.train_seconds / max(result.steps, 1),
        "steps": result.steps, "eval_start": result.eval_start, "eval_end": result.eval_end,
    }


def table(rows: list[dict]) -> str:
    """Return the Markdown table of the figures."""
    lines = ["| model | method | trainable | % | delta MB | peak RSS GB | s/step | eval start | eval end |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        key = "eval_accuracy" if "eval_accuracy" in r["eval_end"] else "eval_loss"
        fmt = "{:.1%}" if key == "eval_accuracy" else "{:.4f}"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.3f} | "
            f"{r['delta_mb']:.2f} | {r['peak_rss_gb']:.2f} | {r['s_per_step']:.2f} | "
            f"{fmt.format(r['eval_start'][key])} | {fmt.format(r['eval_end'][key])} |")
    return "\n".join(lines)


def main() -> None:
    """Run every selected method on every selected model, each in a subprocess; print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=[*BUDGETS, "all"], default="all")
    parser.add_argument("--methods", default="all")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(*args.one)), flush=True)
        return
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: this benchmark reads the reference data beside the project")
    models = list(BUDGETS) if args.model == "all" else [args.model]
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    rows = []
    for model in models:
        for method in methods:
            proc = subprocess.run([sys.executable, __file__, "--one", model, method], capture_output=True, text=True)
            found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            row = json.loads(found[0][7:]) if found else {
                "model": model, "method": method, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
            OUT.mkdir(parents=True, exist_ok=True)
            (OUT / "results.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
