"""Optimizer and learning-rate schedule: AdamW with linear warmup then linear, cosine or constant."""

from __future__ import annotations

import math

import torch
from torch import nn

from deltatune.config import TrainConfig


def build_optimizer(params: dict[str, nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Return AdamW over ``params``; biases and norm weights (1-D tensors) get no weight decay."""
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """Return the number of warmup steps: ``warmup`` is a fraction of the steps when < 1."""
    return math.ceil(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)


def lr_factor(step: int, total_steps: int, warmup: int, schedule: str) -> float:
    """Return the multiplier of the peak learning rate for optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Return a LambdaLR following :func:`lr_factor` over ``total_steps`` optimizer steps."""
    warm = warmup_steps(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warm, cfg.schedule))
