"""Full fine-tuning: every weight of the model trains. The baseline every other method is compared with.

    theta' = theta - lr * update(grad L(theta))        for every parameter theta

The delta is the whole fine-tuned state: every parameter under ``base_model.model.<name>`` in
``adapter_model.safetensors`` (tied weights once), ``peft_type: "FULL"`` and a ``deltatune`` block in
``adapter_config.json``. Loading copies the tensors over the base model's; merging is a no-op, since the
trained weights already are the model's weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar, Literal

import torch
from torch import nn

from deltatune.config import MethodConfig
from deltatune.errors import DeltatuneError
from deltatune.methods.base import (
    PEFT_PREFIX,
    OwnedTensorsMethod,
    register_method,
    trainable_parameters,
)
from deltatune.quantize import refuse_quantized


class FullConfig(MethodConfig):
    recommended_lr: ClassVar[tuple[float, float]] = (2e-5, 1e-4)
    trains_all_weights: ClassVar[bool] = True
    name: Literal["full"] = "full"
    """The fine-tuning method."""


def own_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Return ``{saved name: parameter}`` for every trainable parameter of the model's own tensors."""
    return {f"{PEFT_PREFIX}{n}": p for n, p in trainable_parameters(model).items()}


@register_method
class FullMethod(OwnedTensorsMethod):
    """Full fine-tuning (see the module docstring)."""

    name = "full"
    config_class = FullConfig
    mergeable = True
    peft_type = "FULL"

    def attach(self, model: nn.Module) -> nn.Module:
        """Give every parameter ``requires_grad=True``; returns the model unchanged otherwise."""
        refuse_quantized(model, self.name, "it trains every weight, and 4/8-bit weights are integer codes "
                         "that take no gradient step")
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def owned_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Return every parameter under ``base_model.model.<name>``."""
        return dict(own_parameters(model))

    def merge(self, model: nn.Module) -> nn.Module:
        """Return the model: its weights already are the fine-tuned weights."""
        return model

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[None]:
        """Refused: full fine-tuning changes every weight and keeps no second copy of the base. Where the base's
        outputs are needed (a preference reference), compute them before training instead."""
        raise DeltatuneError("method 'full' has no disable switch: it trains every weight and keeps no copy of the "
                             "base; compute what the base gives before training")
        yield  # pragma: no cover
