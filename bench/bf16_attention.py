"""Two facts about torch's CPU attention in bfloat16 that shape deltatune's bf16-mixed training, and a third that
shapes bf16 serving.

    .venv/bin/python bench/bf16_attention.py             # 1 and 2
    .venv/bin/python bench/bf16_attention.py --prefill   # 3 (loads the bundled SmolLM2 in bf16)
    .venv/bin/python bench/bf16_attention.py --generate  # 3, through deltatune's generate (eval, chat)

1. Speed: torch's causal ``scaled_dot_product_attention`` (flash attention) forward + backward of one example
   (SmolLM2's 9 query and 3 key/value heads of 64) is no faster in bfloat16 than in float32, unlike the matmuls
   (bench/speed.py measures those: about 4.5x), so it would cap what bf16 gains on a training step. deltatune's
   bf16 path for sequences up to 2,048 tokens (``compute.attention._CausalAttentionBF16`` and, over 256 tokens,
   ``_BlockedCausalAttentionBF16``: batched bf16 matmuls, recompute in backward) is the third column.
2. Memory: flash attention's bfloat16 backward keeps something per sequence length it meets (a compiled kernel);
   resident memory grows with every new length and stays. Rounding lengths up to a multiple of 64 (what deltatune
   does on its flash path in bf16, sequences over 2,048 tokens: ``compute.attention.causal_sdpa``) keeps the count
   of lengths small.
3. The same holds for the bf16 matmuls (oneDNN): a server prefilling prompts of ever-new lengths grows;
   ``serving.engine.prefill`` rounds prompts up to 64 tokens in bf16 on a CPU. ``--prefill`` prefills 200 prompt
   lengths (21-618 tokens) with and without the rounding and prints the resident memory each added;
   ``--generate`` does the same through ``infer.generate.generate`` (what ``deltatune eval``'s exact match, ``generate``
   and ``chat`` call), which left-pads a bf16 batch to a multiple of 64 tokens: 120 prompts of as many lengths.
"""

from __future__ import annotations

import ctypes
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_name

from deltatune.compute.attention import causal_sdpa

LENGTHS = (64, 128, 192, 256, 320, 512, 1024, 2048)


def rss_mb() -> float:
    """Resident memory of this process in MB, after returning free heap pages to the system."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 1e6


def step(length: int, dtype: torch.dtype, deltatune: bool = False) -> None:
    """One causal attention forward and backward of one example of ``length`` tokens (torch's flash attention, or
    deltatune's ``causal_sdpa`` when ``deltatune``)."""
    q = torch.randn(1, 9, length, 64, dtype=dtype, requires_grad=True)
    k = torch.randn(1, 3, length, 64, dtype=dtype, requires_grad=True)
    v = torch.randn(1, 3, length, 64, dtype=dtype, requires_grad=True)
    if deltatune:
        out = causal_sdpa(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out.float().sum().backward()


def timing() -> None:
    """Print forward + backward milliseconds per example length: flash attention in float32 and bfloat16, and
    deltatune's bfloat16 attention (the best of 3 rounds of 10 each)."""
    print("| tokens | flash float32 ms | flash bfloat16 ms | deltatune bfloat16 ms | deltatune vs flash bf16 |\n"
          "| ---: | ---: | ---: | ---: | ---: |")
    for length in LENGTHS:
        cells = []
        for dtype, mine in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
            step(length, dtype, mine)
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                for _ in range(10):
                    step(length, dtype, mine)
                best = min(best, (time.perf_counter() - started) / 10 * 1e3)
            cells.append(best)
        print(f"| {length} | {' | '.join(f'{c:.2f}' for c in cells)} | {cells[1] / cells[2]:.2f}x |")


def growth(rounded: bool, count: int = 24) -> float:
    """Resident memory added by ``count`` bf16 backward passes of lengths 400, 407, ... (rounded up to 64 when
    ``rounded``); returns MB."""
    step(400, torch.bfloat16)
    before = rss_mb()
    for i in range(count):
        length = 400 + 7 * i
        step(length + (-length % 64 if rounded else 0), torch.bfloat16)
    return rss_mb() - before


def prefill_growth(step: int) -> float:
    """Resident memory (MB) added by prefilling 200 prompts of lengths 21, 24, ..., 618 into SmolLM2 in bf16 through
    ``serving.engine.prefill`` rounding prompts up to ``step`` tokens (1: no rounding)."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from deltatune.models import resolve_source
    from deltatune.serving.engine import prefill

    model = AutoModelForCausalLM.from_pretrained(resolve_source("default"), dtype=torch.bfloat16).eval()
    cpu = torch.device("cpu")
    with torch.no_grad():
        prefill(model, list(range(20)), DynamicCache(), 0, step, 8192, cpu)
        before = rss_mb()
        for length in range(21, 621, 3):
            prefill(model, torch.randint(0, 1000, (length,)).tolist(), DynamicCache(), 0, step, 8192, cpu)
    return rss_mb() - before


def generate_growth(step: int) -> float:
    """Resident memory (MB) added by greedy replies (2 tokens each) to 120 prompts of 120 lengths, one per batch,
    from SmolLM2 in bf16 through ``infer.generate.generate``, its batches padded to a multiple of ``step`` (1: to
    the longest prompt only)."""
    from unittest.mock import patch

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.infer.generate import generate
    from deltatune.models import resolve_source

    source = resolve_source("default")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    prompts = [f"Count the words: {'word ' * k}" for k in range(1, 121)]
    with patch("deltatune.infer.generate.shape_step", return_value=step):
        generate(model, tokenizer, ["Hello"], max_new_tokens=2)
        before = rss_mb()
        for prompt in prompts:
            generate(model, tokenizer, [prompt], max_new_tokens=2)
    return rss_mb() - before


def main() -> None:
    """Print the measurements (the attention ones, or with --prefill the prefill one, in a fresh process each)."""
    print(f"# bench/bf16_attention.py: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    mode = next((a for a in ("--prefill", "--generate") if a in sys.argv[1:]), None)
    if mode:
        measure = prefill_growth if mode == "--prefill" else generate_growth
        if len(sys.argv) > 2:  # a child: one measurement in its own process
            print(f"{measure(int(sys.argv[2])):.0f}")
            return
        import subprocess

        what = ("200 bf16 prefills of prompts of 21-618 tokens" if mode == "--prefill"
                else "120 bf16 generate() calls on prompts of 120 lengths")
        for step in (1, 64):
            out = subprocess.run([sys.executable, __file__, mode, str(step)], capture_output=True, text=True,
                                 check=True).stdout.strip().splitlines()[-1]
            label = "unrounded" if step == 1 else "rounded up to 64 (what deltatune does)"
            print(f"{what}, {label}: {out} MB of resident memory added")
        return
    timing()
    raw = growth(rounded=False)
    rounded = growth(rounded=True)
    print(f"\nresident memory added by 24 bf16 backward passes of 24 new lengths: {raw:.0f} MB "
          f"({raw / 24:.1f} MB per length); the same lengths rounded up to 64 (2 new lengths): {rounded:.0f} MB")


if __name__ == "__main__":
    main()
