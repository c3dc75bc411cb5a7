"""Two facts about torch's CPU attention in bfloat16 that shape deltatune's bf16-mixed training.

    .venv/bin/python bench/bf16_attention.py

1. Speed: torch's causal ``scaled_dot_product_attention`` (flash attention) forward + backward of one example
   (SmolLM2's 9 query and 3 key/value heads of 64) is no faster in bfloat16 than in float32, unlike the matmuls
   (bench/speed.py measures those: about 4.5x), so it would cap what bf16 gains on a training step. deltatune's
   bf16 path for sequences up to 2,048 tokens (``compute.attention._CausalAttentionBF16`` and, over 256 tokens,
   ``_BlockedCausalAttentionBF16``: batched bf16 matmuls, recompute in backward) is the third column.
2. Memory: flash attention's bfloat16 backward keeps something per sequence length it meets (a compiled kernel);
   resident memory grows with every new length and stays. Rounding lengths up to a multiple of 64 (what deltatune
   does on its flash path in bf16, sequences over 2,048 tokens: ``compute.attention.causal_sdpa``) keeps the count
   of lengths small.
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


def main() -> None:
    """Print both measurements."""
    print(f"# bench/bf16_attention.py: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    timing()
    raw = growth(rounded=False)
    rounded = growth(rounded=True)
    print(f"\nresident memory added by 24 bf16 backward passes of 24 new lengths: {raw:.0f} MB "
          f"({raw / 24:.1f} MB per length); the same lengths rounded up to 64 (2 new lengths): {rounded:.0f} MB")


if __name__ == "__main__":
    main()
