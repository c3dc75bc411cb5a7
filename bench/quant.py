"""Quantized bases: memory of the base weights, peak memory and time of a training step, and eval loss after
the same steps, for float32 vs int8 vs nf4 vs nf4 + double quantization (QLoRA). Prints figures; not a test.

Every configuration runs in its own subprocess, so each peak memory is that configuration's alone (CPU: the
process's peak resident set during one training step, reset just before it via /proc/self/clear_refs;
CUDA: torch.cuda.max_memory_allocated over the step).

    .venv/bin/python bench/quant.py                       # everything: memory table, then quality table
    .venv/bin/python bench/quant.py memory --shapes smollm2,0.5b --seq 128
    .venv/bin/python bench/quant.py quality --steps 100   # LoRA vs int8 LoRA vs QLoRA on alpaca_en_demo

Shapes: `smollm2` (the bundled SmolLM2-135M-Instruct), `0.5b` and `1.5b` (random-initialised Llama-shaped
models built from a config, Qwen2.5-0.5B / -1.5B widths; nothing is downloaded). bench/quant_cuda.py runs
the same on a GPU with bfloat16 compute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"
SHAPES: dict[str, dict[str, int]] = {  # Llama-shaped, random weights; tied embeddings as in the Qwen2.5 models
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "vocab_size": 151936},
}
STORAGES = ["float32", "int8", "nf4", "nf4+dq"]
QUALITY = {  # name: overrides on top of the shared LoRA settings
    "float32 LoRA": ["method.name=lora"],
    "int8 LoRA": ["method.name=lora", "model.quantize=int8"],
    "QLoRA (nf4+dq, paged 8-bit AdamW)": ["method.name=qlora"],
}


# ---- the workers: one configuration per process -------------------------------------------------------

def _peak_rss_reset() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _build(shape: str, storage: str, device: Any, compute: str) -> tuple[Any, int]:
    """Return (model with LoRA attached, number of linear weights quantized or quantizable)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import deltatune as dt
    from deltatune.config import ModelConfig
    from deltatune.quantize import quantize_model, spec_from_config

    quant = {"float32": "none", "int8": "int8", "nf4": "nf4", "nf4+dq": "nf4"}[storage]
    dq = storage == "nf4+dq"
    float_dtype = "float32" if storage == "float32" or device.type == "cpu" else compute
    if shape == "smollm2":
        model = dt.load_model(ModelConfig(name="default", device=device.type, quantize=quant, double_quant=dq
                                          if quant in ("nf4",) else None, compute_dtype=compute,
                                          dtype=float_dtype)).model
    else:
        config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=True)
        torch.manual_seed(0)
        with torch.device("cpu"):
            model = LlamaForCausalLM(config).to(getattr(torch, float_dtype))
        spec = spec_from_config(quant, dq if quant == "nf4" else None, compute, device)
        if spec is not None:
            quantize_model(model, spec, device)
        model.to(device)
    numel = sum(m.in_features * m.out_features for n, m in model.named_modules()
                if hasattr(m, "in_features") and n != "lm_head")
    return model, numel


def worker_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Build one (shape, storage), attach LoRA, run two training steps; return its figures."""
    import gc

    import torch

    import deltatune as dt
    from deltatune.compute.loss import causal_lm_loss_sum
    from deltatune.config import TrainConfig
    from deltatune.methods import trainable_parameters
    from deltatune.quantize import weight_bytes
    from deltatune.training.optim import build_optimizer

    device = torch.device(args.device)
    import transformers  # noqa: F401  (so the process's own footprint is measured before the model)

    args.process_before = _vm("VmRSS") if device.type == "cpu" else 0
    torch.manual_seed(0)
    model, linear_numel = _build(args.shape, args.storage, device, args.compute)
    dt.attach(model, {"name": "lora", "r": 16, "alpha": 32})
    sizes = weight_bytes(model)
    quantized = {k: v for k, v in sizes.items() if k in ("int8", "nf4", "nf4+dq")}
    linear_bytes = sum(quantized.values()) if quantized else 4 * linear_numel
    optimizer_name = "paged_adamw_8bit" if args.storage == "nf4+dq" else "adamw"
    params = trainable_parameters(model)
    optimizer = build_optimizer(params, TrainConfig(optimizer=optimizer_name), 1e-4)
    if args.gc:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100  # an SFT row: the first half is prompt, the loss is on the response
    batch = {"input_ids": ids, "labels": labels}

    def step() -> float:
        started = time.perf_counter()
        if args.full_logits:  # what a plain transformers loop does: logits at every position
            model(input_ids=ids, labels=labels).loss.backward()
        else:  # deltatune's training step: the output layer only where the next token is supervised
            causal_lm_loss_sum(model, batch)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    step()  # the first step also creates the optimizer state
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    else:
        resident = _vm("VmRSS")
        _peak_rss_reset()
    seconds = [step() for _ in range(args.timed_steps)]
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _vm("VmHWM")
    return {"shape": args.shape, "storage": args.storage, "optimizer": optimizer_name,
            "params": sum(p.numel() for p in model.parameters()), "linear_weights": linear_numel,
            "base_weight_bytes": sum(sizes.values()), "linear_weight_bytes": linear_bytes,
            "process_bytes_before_model": args.process_before,
            "weight_bytes_by_type": sizes, "resident_bytes": resident, "peak_step_bytes": peak,
            "s_per_step": min(seconds)}


def worker_quality(args: argparse.Namespace) -> dict[str, Any]:
    """Train one quality configuration on alpaca_en_demo through the product's own loop; return figures."""
    import torch

    from deltatune.config import load_config
    from deltatune.training.loop import train

    overrides = QUALITY[args.config]
    out = ROOT / "runs" / f"bench-quant-{args.device}-{overrides[-1].split('=')[-1]}"
    compute = [] if args.device == "cpu" else [f"model.dtype={args.compute}"]
    if args.device == "cuda" and args.config == "float32 LoRA":
        compute = ["model.dtype=float32"]
    cfg = load_config(None, [f"data.train={DATA}", "data.eval=0.1", f"data.max_length={args.max_length}",
                             "method.r=16", "method.alpha=32", "method.dropout=0.05",
                             f"train.max_steps={args.steps}", f"train.batch_size={args.batch}", "train.lr=2e-4",
                             "train.warmup=0.1", f"model.device={args.device}", f"output.dir={out}",
                             "output.overwrite=true", "train.eval_generations=0", *compute, *overrides])
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = train(cfg, progress=False)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else _vm("VmHWM")
    return {"config": args.config, "steps": result.steps, "eval_loss_start": result.eval_start["eval_loss"],
            "eval_loss_end": result.eval_end["eval_loss"], "s_per_step": result.train_seconds / max(result.steps, 1),
            "peak_bytes": peak, "optimizer": cfg.train.optimizer}


# ---- the driver: one subprocess per configuration, then the tables ------------------------------------

def _run_worker(argv: list[str]) -> dict[str, Any] | None:
    env = dict(os.environ)
    if argv[0] == "memory":  # freed tensors go back to the OS at once: a peak reflects this step, not the
        # allocator's history (this slows CPU steps by about a third; the quality table runs without it)
        env.update({"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"})
    proc = subprocess.run([sys.executable, __file__, "--worker", *argv], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        print(f"  failed: {' '.join(argv)}\n{tail}", file=sys.stderr)
        return None
    return json.loads(lines[-1].removeprefix("RESULT "))


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def run_memory(opts: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure every (shape, storage) in its own process; print and return the rows."""
    rows = []
    print(f"\n## memory and time of a LoRA (r 16) training step, batch {opts.batch} x {opts.seq} tokens (loss on "
          f"the second half), {opts.device}{', gradient checkpointing' if opts.gc else ''}"
          f"{', full logits' if opts.full_logits else ', logits at supervised positions'}\n")
    print("| shape | storage | params | linear weights MiB (x float32) | base weights MiB | peak step MiB "
          "(x float32) | s/step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape in opts.shapes.split(","):
        base: dict[str, Any] | None = None
        for storage in opts.storages.split(","):
            argv = ["memory", "--shape", shape, "--storage", storage, "--device", opts.device, "--compute",
                    opts.compute, "--seq", str(opts.seq), "--batch", str(opts.batch),
                    "--timed-steps", str(opts.timed_steps)] + (["--gc"] if opts.gc else []) + (
                    ["--full-logits"] if opts.full_logits else [])
            row = _run_worker(argv)
            if row is None:
                continue
            rows.append(row)
            base = base or (row if storage == "float32" else None)
            lin = f"{_mb(row['linear_weight_bytes'])}" + (
                f" ({row['linear_weight_bytes'] / base['linear_weight_bytes']:.3f}x)" if base else "")
            peak = f"{_mb(row['peak_step_bytes'])}" + (
                f" ({row['peak_step_bytes'] / base['peak_step_bytes']:.2f}x)" if base else "")
            label = storage + (" (QLoRA: paged 8-bit AdamW)" if storage == "nf4+dq" else "")
            print(f"| {shape} | {label} | {row['params'] / 1e6:,.0f}M | {lin} | {_mb(row['base_weight_bytes'])} "
                  f"| {peak} | {row['s_per_step']:.2f} |", flush=True)
    return rows


def run_quality(opts: argparse.Namespace) -> list[dict[str, Any]]:
    """Train each quality configuration on SmolLM2 in its own process; print and return the rows."""
    if not DATA.is_file():
        print(f"{DATA} not found: skipping the quality benchmark", file=sys.stderr)
        return []
    print(f"\n## SmolLM2-135M-Instruct on alpaca_en_demo: {opts.steps} steps of {opts.batch} examples "
          f"(max {opts.max_length} tokens), LoRA r 16 alpha 32 all-linear, lr 2e-4, {opts.device}\n")
    print("| config | optimizer | eval loss start | eval loss end | gap to float32 | s/step | peak MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows, ref = [], None
    for name in QUALITY:
        row = _run_worker(["quality", "--config", name, "--device", opts.device, "--compute", opts.compute,
                           "--steps", str(opts.steps), "--batch", str(opts.batch),
                           "--max-length", str(opts.max_length)])
        if row is None:
            continue
        rows.append(row)
        ref = ref if ref is not None else row["eval_loss_end"]
        print(f"| {name} | {row['optimizer']} | {row['eval_loss_start']:.4f} | {row['eval_loss_end']:.4f} | "
              f"{row['eval_loss_end'] - ref:+.4f} | {row['s_per_step']:.2f} | {_mb(row['peak_bytes'])} |", flush=True)
    return rows


def parser(device: str = "cpu", compute: str = "float32") -> argparse.ArgumentParser:
    """Return the command-line parser (defaults for ``device``/``compute``; quant_cuda.py uses cuda/bf16)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=["all", "memory", "quality"], default="all")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default=device)
    p.add_argument("--compute", default=compute, help="compute dtype of 4-bit layers (cuda: also the dtype of the "
                   "unquantized parts of the int8/nf4 models; the float32 rows stay float32)")
    p.add_argument("--shapes", default="smollm2,0.5b,1.5b")
    p.add_argument("--storages", default=",".join(STORAGES))
    p.add_argument("--seq", type=int, default=256, help="memory: tokens per row")
    p.add_argument("--batch", type=int, default=None, help="rows per step (memory: 1, quality: 4)")
    p.add_argument("--timed-steps", type=int, default=1, help="memory: steps timed after the first")
    p.add_argument("--gc", action="store_true", help="memory: gradient checkpointing")
    p.add_argument("--full-logits", action="store_true", help="memory: compute the output layer at every position "
                   "(a plain transformers step) instead of deltatune's supervised positions only")
    p.add_argument("--steps", type=int, default=100, help="quality: optimizer steps")
    p.add_argument("--max-length", type=int, default=512, help="quality: data.max_length")
    # worker-only
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--storage", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None, device: str = "cpu", compute: str = "float32") -> None:
    """Run the benchmark (or, with --worker, one configuration, printing its RESULT line)."""
    opts = parser(device, compute).parse_args(argv)
    if opts.worker:
        if opts.what == "memory":
            opts.batch = opts.batch or 1
            print("RESULT " + json.dumps(worker_memory(opts)), flush=True)
        else:
            opts.batch = opts.batch or 4
            print("RESULT " + json.dumps(worker_quality(opts)), flush=True)
        return
    import torch

    started = time.perf_counter()
    print(f"# bench/quant.py on {opts.device} (torch {torch.__version__}, {torch.get_num_threads()} threads); "
          f"command: {' '.join(sys.argv)}")
    if opts.what in ("all", "memory"):
        batch = opts.batch
        opts.batch = batch or 1
        run_memory(opts)
        opts.batch = batch
    if opts.what in ("all", "quality"):
        opts.batch = opts.batch or 4
        run_quality(opts)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
