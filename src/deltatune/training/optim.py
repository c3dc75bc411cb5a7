"""Optimizer and learning-rate schedule: AdamW with linear warmup then linear, cosine or constant.

``train.optimizer`` picks the AdamW implementation: ``adamw`` (torch), ``adamw_8bit`` (bitsandbytes:
both moments stored in 8 bits with block-wise dynamic quantization, Dettmers et al. 2022, "8-bit
Optimizers via Block-wise Quantization"), ``paged_adamw`` / ``paged_adamw_8bit`` (the moments live in
CUDA unified memory, paged to the CPU under memory spikes: QLoRA's third ingredient). Paging is a CUDA
feature; on the CPU the paged choices run their unpaged twin (the same update) and say so once.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from deltatune.config import HEAD_LR, MethodConfig, TrainConfig
from deltatune.errors import DeltatuneError
from deltatune.methods.base import RateSwitch

_BNB_CLASSES = {"adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw_8bit": "PagedAdamW8bit"}
_UNPAGED = {"paged_adamw": "adamw", "paged_adamw_8bit": "adamw_8bit"}
_said: set[str] = set()


def _say_once(text: str) -> None:
    if text not in _said:
        _said.add(text)
        print(text, flush=True)


def resolve_optimizer(name: str, device: torch.device) -> str:
    """Return the optimizer that actually runs for ``train.optimizer`` on ``device``: a paged one becomes
    its unpaged twin off CUDA (printing a note once per process)."""
    if name in _UNPAGED and device.type != "cuda":
        _say_once(f"note: train.optimizer={name}: paging needs CUDA unified memory and does not apply on "
                  f"{device.type}; running {_UNPAGED[name]}, the same update")
        return _UNPAGED[name]
    return name


def peak_learning_rates(train: TrainConfig, method: MethodConfig, task: str) -> tuple[float, float]:
    """Return ``(lr, head_lr)``: ``train.lr`` or the method's recommended rate for ``task``, and the rate of
    a classifier's fresh head (``train.head_lr``, else ``train.lr`` when set, else the method's rate but at
    least ``HEAD_LR``: a fresh head learns from scratch, even beside a method whose own rate is small)."""
    lr = train.lr if train.lr is not None else method.default_lr(task)
    head_lr = train.head_lr or train.lr or max(lr, HEAD_LR)
    return lr, head_lr


def build_optimizer(params: dict[str, nn.Parameter], cfg: TrainConfig, lr: float,
                    lr_of: dict[str, float] | None = None,
                    switch_of: dict[str, RateSwitch] | None = None) -> torch.optim.Optimizer:
    """Return the AdamW variant of ``cfg.optimizer`` over ``params`` (``{name: parameter}``) at peak rate
    ``lr``; a parameter named in ``lr_of`` trains at that rate instead, one named in ``switch_of`` changes
    its peak rate at a step (the group keeps ``rate_switch = (at_step, rate)`` for :func:`build_scheduler`).
    Biases, norm weights and other 1-D tensors get no weight decay."""
    lr_of, switch_of = lr_of or {}, switch_of or {}
    grouped: dict[tuple[float, bool, RateSwitch | None], list[nn.Parameter]] = {}
    for name, p in params.items():
        grouped.setdefault((lr_of.get(name, lr), p.ndim >= 2, switch_of.get(name)), []).append(p)
    groups: list[dict[str, Any]] = []
    for (rate, decay, switch), ps in grouped.items():
        groups.append({"params": ps, "lr": rate, "weight_decay": cfg.weight_decay if decay else 0.0})
        if switch is not None:
            groups[-1]["rate_switch"] = (switch.at_step, switch.rate)
    first = next(iter(params.values()), None)
    device = first.device if first is not None else torch.device("cpu")
    name = resolve_optimizer(cfg.optimizer, device)
    kwargs: dict[str, Any] = {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8}
    if name == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise DeltatuneError(f"train.optimizer={cfg.optimizer} needs bitsandbytes: pip install "
                             "'deltatune[quant]', or use train.optimizer=adamw") from None
    return getattr(bnb.optim, _BNB_CLASSES[name])(groups, **kwargs)


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
    """Return a LambdaLR following :func:`lr_factor` over ``total_steps`` optimizer steps; a group with a
    ``rate_switch`` follows the same curve scaled to its new peak rate from the switch's step on."""
    warm = warmup_steps(cfg, total_steps)

    def schedule(group: dict[str, Any]) -> Any:
        at_step, rate = group.get("rate_switch", (math.inf, group["lr"]))
        scale = rate / group["lr"]
        return lambda step: lr_factor(step, total_steps, warm, cfg.schedule) * (scale if step >= at_step else 1.0)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule(g) for g in optimizer.param_groups])
