"""bench/quant.py on a GPU: the same tables with bfloat16 compute for int8 / nf4 / QLoRA, beside the float32
LoRA baseline (float32 weights and compute), in one script. Needs CUDA and bitsandbytes' CUDA kernels.

    .venv/bin/python bench/quant_cuda.py                              # full: 100 quality steps
    .venv/bin/python bench/quant_cuda.py --steps 20 --shapes smollm2,1.5b    # a shorter run

Peak memory is torch.cuda.max_memory_allocated over one training step (after a first step that creates
the optimizer state); every configuration runs in its own process.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quant import main

if __name__ == "__main__":
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/quant_cuda.py needs a CUDA GPU; on a CPU run bench/quant.py")
    main(device="cuda", compute="bfloat16")
