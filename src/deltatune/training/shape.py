"""How many optimizer steps a run has and which batching it uses: one rule, for train, eval and compare.

    shape = run_shape(cfg, task="causal_lm", examples=len(train_set), world=1)
    shape.mode, shape.total_steps       # "pack", 120

A step takes ``grad_accum`` micro-batches of ``batch_size`` examples on each of ``world`` ranks; an epoch is
every example once. ``max_steps`` wins over ``epochs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from deltatune.config import DataConfig, RunConfig


def batching_mode(data: DataConfig, task: str) -> str:
    """Return the batching a run of ``task`` uses: ``data.batching`` for causal LMs; classifiers are never packed
    (one label per sequence), so ``pack`` becomes ``bucket`` for them."""
    if task == "causal_lm":
        return data.batching
    return "pad" if data.batching == "pad" else "bucket"


@dataclass(frozen=True)
class RunShape:
    """The batching and step counts of a run."""

    mode: str  # pack | bucket | pad
    micro_per_step: int  # micro-batches per optimizer step, over all ranks
    steps_per_epoch: int
    total_steps: int


def run_shape(cfg: RunConfig, *, task: str, examples: int, world: int = 1, pairs: bool = False) -> RunShape:
    """Return the shape of a run of ``cfg`` over ``examples`` training examples (after tokenization) on ``world``
    ranks. Preference ``pairs`` are always packed (each pair's prompt shared by its replies, data/pairs.py)."""
    t = cfg.train
    micro_per_step = t.grad_accum * world
    steps_per_epoch = math.ceil(math.ceil(examples / t.batch_size) / micro_per_step)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    return RunShape("pack" if pairs else batching_mode(cfg.data, task), micro_per_step, steps_per_epoch, total_steps)
