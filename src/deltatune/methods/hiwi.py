"""HiWi: an adapter applied to the pre-trained weights instead of the hidden states.

Liao, Meng, Monz 2023, "Parameter-Efficient Fine-Tuning without Introducing New Latency" (ACL 2023).
A bottleneck adapter ``A(v) = f(v W_down) W_up`` (``W_down: (d, r)``, ``W_up: (r, d)``) is fed with the
pre-trained parameters of the feed-forward layers rather than with activations:

    on: weights     W' = W + A(W)     (every input's weight vector W[:, j], of size d = out features)
    on: biases      b' = b + A(b)

The forward pass uses ``W'`` (``b'``) in place of ``W`` (``b``); after training ``W'`` is computed once and
written into the weights, so the fine-tuned model has exactly the base architecture and inference costs
what the base costs. ``W_up`` starts at zero, so ``A = 0`` and the attached model is the base model.
The paper leaves open which axis of a weight the adapter reads; here it reads the output axis, the
same axis as the bias, so one adapter shape serves both settings. ``on: biases`` (the paper's most
storage-efficient setting) needs layers with biases (BERT-style models; Llama has none).

The delta holds the adapters' own parameters (``base_model.model.<layer>.hiwi_down`` / ``.hiwi_up``,
much smaller than the updated weights), with ``peft_type: "HIWI"`` and a ``deltatune`` block; ``merge``
folds them into the weights.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from deltatune.config import MethodConfig
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.methods.base import (
    FFN_LINEAR,
    PEFT_PREFIX,
    OwnedTensorsMethod,
    find_targets,
    freeze,
    head_parameters,
    register_method,
    set_submodule,
    unfreeze_heads,
)
from deltatune.quantize import refuse_quantized

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class HiWiConfig(MethodConfig):
    recommended_lr: ClassVar[tuple[float, float]] = (1e-3, 1e-3)
    name: Literal["hiwi"] = "hiwi"
    """The fine-tuning method."""
    on: Literal["weights", "biases"] = "weights"
    """Feed the adapter with the pre-trained weights or with the biases."""
    bottleneck: int = Field(default=8, ge=1)
    """The adapter's inner size r."""
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    """The activation f inside the adapter."""
    targets: str | list[str] = FFN_LINEAR
    """The layers whose parameters are adapted: default every feed-forward linear layer."""


class HiWiLinear(nn.Module):
    """A frozen linear layer computed with adapted parameters ``W + A(W)`` or ``b + A(b)``."""

    def __init__(self, base_layer: nn.Linear, bottleneck: int, non_linearity: str, on: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.on = on
        self.non_linearity = non_linearity
        d, device = base_layer.out_features, base_layer.weight.device
        self.hiwi_down = nn.Parameter(torch.empty(d, bottleneck, device=device, dtype=torch.float32))
        self.hiwi_up = nn.Parameter(torch.zeros(bottleneck, d, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.hiwi_down.T, a=math.sqrt(5))  # as nn.Linear(d, r) would

    def adapt(self, v: torch.Tensor) -> torch.Tensor:
        """Return ``A(v) = f(v W_down) W_up`` for rows ``v`` of size d (float32)."""
        return ACTIVATIONS[self.non_linearity](v.float() @ self.hiwi_down) @ self.hiwi_up

    def adapted(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the adapted (weight, bias) in the base dtype."""
        w, b = self.base_layer.weight, self.base_layer.bias
        if self.on == "weights":  # columns W[:, j] are the vectors of size d = out features
            return w + self.adapt(w.T).T.to(w.dtype), b
        assert b is not None
        return w, b + self.adapt(b.unsqueeze(0)).squeeze(0).to(b.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.adapted()
        return F.linear(x, w, b)


def hiwi_layers(model: nn.Module) -> list[tuple[str, HiWiLinear]]:
    """Return ``(name, layer)`` for every HiWi layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, HiWiLinear)]


@register_method
class HiWiMethod(OwnedTensorsMethod):
    """HiWi (see the module docstring)."""

    peft_type = "HIWI"
    name = "hiwi"
    config_class = HiWiConfig
    mergeable = True
    config: HiWiConfig

    def attach(self, model: nn.Module) -> nn.Module:
        """Freeze the model and wrap every target in a HiWiLinear (zero update); returns the model."""
        if hiwi_layers(model):
            raise DeltatuneError("this model already has HiWi layers; load a fresh base model")
        cfg = self.config
        refuse_quantized(model, self.name, "it computes each target layer from its dense pre-trained weights "
                         "(W' = W + A(W)), and a quantized base keeps no dense weights")
        targets = find_targets(model, cfg.targets)
        if cfg.on == "biases":
            missing = [n for n in targets if model.get_submodule(n).bias is None]
            if missing:
                raise ConfigError(f"method.on: biases, but {missing[0]} (and {len(missing) - 1} more) has no bias; "
                                  "use on: weights for this model")
        freeze(model)
        for name in targets:
            set_submodule(model, name, HiWiLinear(model.get_submodule(name), cfg.bottleneck, cfg.non_linearity,
                                                  cfg.on))
        unfreeze_heads(model)
        return model

    def owned_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, layer in hiwi_layers(model):
            out[f"{PEFT_PREFIX}{name}.hiwi_down"] = layer.hiwi_down
            out[f"{PEFT_PREFIX}{name}.hiwi_up"] = layer.hiwi_up
        out.update(head_parameters(model))
        return out



    @torch.no_grad()
    def merge(self, model: nn.Module) -> nn.Module:
        """Write the adapted weights (biases) into the layers and put the plain nn.Linear back."""
        for name, layer in hiwi_layers(model):
            w, b = layer.adapted()
            base = layer.base_layer
            base.weight.copy_(w)
            if b is not None:
                base.bias.copy_(b)
            set_submodule(model, name, base)
        return model
