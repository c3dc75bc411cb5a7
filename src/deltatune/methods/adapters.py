"""Bottleneck adapters inside every transformer block.

An adapter is a small residual MLP, ``A(h) = W_up f(W_down h + b_down) + b_up`` with ``W_down: (m, d)``
and ``W_up: (d, m)``, ``m = d / reduction_factor``. Where it sits is the variant:

- ``houlsby`` (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"): after the attention
  output projection and after the feed-forward output projection, before each residual add:
  ``h <- h + A(h)``.
- ``pfeiffer`` (Pfeiffer et al. 2020/2021, "AdapterFusion"): the same, after the feed-forward only.
- ``parallel`` (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning"):
  beside the feed-forward, fed with its input ``x``: ``FFN(x) + s * A(x)`` with ``s = 4`` as in the paper.

``W_up`` and ``b_up`` start at zero (so ``A = 0`` and the model computes exactly what the base computes);
``W_down`` keeps nn.Linear's Kaiming-uniform init. Houlsby et al. also train the layer norms; here only the
adapters (and a classifier head) train. The layers are found by name patterns that cover Llama-style
(``self_attn.o_proj``, ``mlp.up_proj`` / ``mlp.down_proj``) and BERT-style (``attention.output.dense``,
``intermediate.dense`` / ``output.dense``) models. The parallel adapter reads the feed-forward input at
the feed-forward's first linear layer (``up_proj`` / ``intermediate.dense``) through a small tap module.

Adapters add latency and cannot be merged. Saved as ``base_model.model.<layer>.adapter_down.weight`` ...
with ``peft_type: "ADAPTER"`` and a ``deltatune`` block.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.config import MethodConfig
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.methods.base import (
    PEFT_PREFIX,
    OwnedTensorsMethod,
    find_targets,
    freeze,
    head_parameters,
    register_method,
    set_submodule,
    unfreeze_heads,
)

_BLOCK = r".*\.(layers|layer|h|blocks|block)\.(\d+)\."
ATTN_OUT = _BLOCK + r"(self_attn\.o_proj|attn\.(out_proj|c_proj)|attention\.output\.dense|self_attention\.dense)"
FFN_IN = _BLOCK + r"(mlp\.(up_proj|fc1|c_fc|dense_h_to_4h)|intermediate\.dense)"
FFN_OUT = _BLOCK + r"(mlp\.(down_proj|fc2|c_proj|dense_4h_to_h)|output\.dense)"

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class AdapterConfig(MethodConfig):
    recommended_lr: ClassVar[tuple[float, float]] = (1e-3, 5e-3)
    name: Literal["adapter"] = "adapter"
    """The fine-tuning method."""
    variant: Literal["houlsby", "pfeiffer", "parallel"] = "pfeiffer"
    """`houlsby`: after attention and feed-forward; `pfeiffer`: after the feed-forward only;
    `parallel`: beside the feed-forward, scaled."""
    reduction_factor: int = Field(default=16, ge=1)
    """Bottleneck size = hidden size / reduction_factor (at least 1)."""
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    """The activation inside the bottleneck."""
    scaling: float | None = None
    """Multiplier of the adapter's output (default: 4 for `parallel`, 1 otherwise)."""


class Bottleneck(nn.Module):
    """``W_up f(W_down h + b_down) + b_up``, zero at init (see the module docstring)."""

    def __init__(self, dim_in: int, dim_out: int, size: int, non_linearity: str, device: torch.device) -> None:
        super().__init__()
        self.adapter_down = nn.Linear(dim_in, size, device=device, dtype=torch.float32)
        self.act = ACTIVATIONS[non_linearity]()
        self.adapter_up = nn.Linear(size, dim_out, device=device, dtype=torch.float32)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.adapter_up(self.act(self.adapter_down(h.to(self.adapter_down.weight.dtype))))


class SequentialAdapter(nn.Module):
    """An output projection followed by a residual adapter: ``y = L(x); y + s A(y)``."""

    def __init__(self, base_layer: nn.Linear, size: int, non_linearity: str, scaling: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        d = base_layer.out_features
        self.adapter = Bottleneck(d, d, size, non_linearity, base_layer.weight.device)
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y + (self.scaling * self.adapter(y)).to(y.dtype)


class ParallelAdapter(nn.Module):
    """A feed-forward output projection plus ``s A(x)`` of the feed-forward input ``x`` (read by a tap)."""

    def __init__(self, base_layer: nn.Linear, dim_in: int, size: int, non_linearity: str, scaling: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = Bottleneck(dim_in, base_layer.out_features, size, non_linearity, base_layer.weight.device)
        self.scaling = scaling
        self.ffn_input: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.ffn_input is None:
            raise DeltatuneError("parallel adapter: the feed-forward input was not seen; is the tap in place?")
        h, self.ffn_input = self.ffn_input, None
        return y + (self.scaling * self.adapter(h)).to(y.dtype)


class InputTap(nn.Module):
    """The feed-forward's first linear layer, unchanged, handing its input to the parallel adapter."""

    def __init__(self, base_layer: nn.Linear, sink: ParallelAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "_sink", sink)  # a reference, not a submodule: its parameters live there

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._sink.ffn_input = x
        return self.base_layer(x)


def adapter_layers(model: nn.Module) -> list[tuple[str, SequentialAdapter | ParallelAdapter]]:
    """Return ``(name, layer)`` for every adapter-carrying layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (SequentialAdapter, ParallelAdapter))]


def _by_block(model: nn.Module, pattern: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for name in find_targets(model, "all-linear"):
        match = re.fullmatch(pattern, name)
        if match:
            out.setdefault(int(match.group(2)), name)
    return out


@register_method
class AdapterMethod(OwnedTensorsMethod):
    """Bottleneck adapters: houlsby, pfeiffer or parallel (see the module docstring)."""

    peft_type = "ADAPTER"
    name = "adapter"
    config_class = AdapterConfig
    config: AdapterConfig

    def attach(self, model: nn.Module) -> nn.Module:
        """Freeze the model and insert an adapter into every block; returns the model."""
        if adapter_layers(model):
            raise DeltatuneError("this model already has adapters; load a fresh base model")
        cfg = self.config
        ffn_out = _by_block(model, FFN_OUT)
        if not ffn_out:
            raise ConfigError("method.name=adapter: found no feed-forward output layer (down_proj, fc2, "
                              "output.dense) in this model")
        freeze(model)
        act = cfg.non_linearity
        if cfg.variant == "parallel":
            ffn_in = _by_block(model, FFN_IN)
            scaling = 4.0 if cfg.scaling is None else cfg.scaling
            for block, out_name in ffn_out.items():
                if block not in ffn_in:
                    raise ConfigError(f"adapter variant parallel: block {block} has no feed-forward input "
                                      "layer (up_proj, fc1, intermediate.dense)")
                first: nn.Linear = model.get_submodule(ffn_in[block])
                last: nn.Linear = model.get_submodule(out_name)
                size = max(1, first.in_features // cfg.reduction_factor)
                par = ParallelAdapter(last, first.in_features, size, act, scaling)
                set_submodule(model, out_name, par)
                set_submodule(model, ffn_in[block], InputTap(first, par))
        else:
            scaling = 1.0 if cfg.scaling is None else cfg.scaling
            names = list(ffn_out.values())
            if cfg.variant == "houlsby":
                names += list(_by_block(model, ATTN_OUT).values())
            for name in names:
                layer: nn.Linear = model.get_submodule(name)
                size = max(1, layer.out_features // cfg.reduction_factor)
                set_submodule(model, name, SequentialAdapter(layer, size, act, scaling))
        unfreeze_heads(model)
        return model

    def owned_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, layer in adapter_layers(model):
            for pname, p in layer.adapter.named_parameters():
                out[f"{PEFT_PREFIX}{name}.{pname}"] = p
        out.update(head_parameters(model))
        return out



    def merge(self, model: nn.Module) -> nn.Module:
        """Adapters are non-linear modules in the forward path: always raises DeltatuneError."""
        raise DeltatuneError(f"method {self.name!r} ({self.config.variant}) cannot be merged into the weights: "
                             "its bottleneck is non-linear; use the delta unmerged, or train lora/ia3/hiwi")
