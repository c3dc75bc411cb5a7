"""LoRA: a trainable low-rank update beside each frozen linear weight (Hu et al. 2021).

    y = W x + (alpha / r) * B (A dropout(x))        A: (r, in)  B: (out, r)

A starts as nn.Linear's Kaiming-uniform init and B as zeros, so the attached model computes exactly
what the base computes (the update is 0) until the first step. rsLoRA (Kalajdzievski 2023) scales by
alpha / sqrt(r) instead, which keeps the update's size stable as r grows. Merging folds
``scaling * B @ A`` into W: the merged model has no extra modules and no extra latency.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") splits the adapted weight into a
trainable magnitude ``m`` (one value per output row, initialised to ``||W||`` row-wise) and a direction:

    W' = m * (W + s B A) / ||W + s B A||_row

with the norm treated as a constant in the backward pass (the paper's section 4.3, as peft does). At
attach ``B = 0`` and ``m = ||W||``, so ``W' = W``. It is computed on the activations, as peft does:
``y = W x + (m / n - 1) (W x) + (m / n) s B A x + bias`` with ``n = ||W + s B A||_row``.

Saved in peft's LoRA format: ``base_model.model.<layer>.lora_A.weight`` / ``.lora_B.weight`` (and
``.lora_magnitude_vector`` with DoRA).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from deltatune.config import MethodConfig
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.methods.base import (
    PEFT_PREFIX,
    OwnedTensorsMethod,
    find_targets,
    freeze,
    head_names,
    head_parameters,
    register_method,
    set_submodule,
    unfreeze_heads,
)
from deltatune.quantize import dense_weight, quantization_of, refuse_quantized_merge


class LoraConfig(MethodConfig):
    recommended_lr: ClassVar[tuple[float, float]] = (2e-4, 1e-3)
    name: Literal["lora"] = "lora"
    """The fine-tuning method."""
    r: int = Field(default=8, ge=1, le=4096)
    """LoRA rank: the inner size of B @ A."""
    alpha: float = Field(default=16.0, gt=0)
    """Scaling numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA branch's input during training."""
    targets: str | list[str] = "all-linear"
    """`all-linear` (every linear layer but the output head), a list of layer names (q_proj, v_proj),
    or a regex on full names."""
    layers: list[int] | None = None
    """Only these block indices (default: all blocks)."""
    use_rslora: bool = False
    """rsLoRA scaling alpha / sqrt(r) instead of alpha / r."""
    use_dora: bool = False
    """DoRA: also train a magnitude per output row, the update only turns the weight's direction."""

    @field_validator("targets")
    @classmethod
    def _targets_not_empty(cls, value: str | list[str]) -> str | list[str]:
        if not value:
            raise ValueError("must name at least one layer, or be `all-linear`")
        return value


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float, use_rslora: bool,
                 use_dora: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        device = base_layer.weight.device
        # adapters train in float32 even over a half-precision base, as peft does by default
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.merged = False
        self.disabled = False
        self.lora_magnitude_vector: nn.Parameter | None = None
        if use_dora:  # m = ||W|| row-wise, so that W' = W at attach
            self.lora_magnitude_vector = nn.Parameter(self._weight_norm(self.delta_weight()))

    def _weight_norm(self, delta: torch.Tensor) -> torch.Tensor:
        """Return ``||W + delta||`` over each output row, in float32 (W de-quantized for a k-bit base)."""
        return torch.linalg.norm(dense_weight(self.base_layer).float() + delta, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or self.disabled:
            return y
        a = self.lora_A.weight
        # under autocast (bf16-mixed) the matmuls run in its dtype: casting x up to the float32 master would only
        # add two copies of the activations
        on = torch.is_autocast_enabled(x.device.type)
        xd = self.lora_dropout(x.to(torch.get_autocast_dtype(x.device.type) if on else a.dtype))
        m = self.lora_magnitude_vector
        if m is None:  # y + s * B(A x) in one op: no separate (tokens x out) product tensor
            return torch.add(y, self.lora_B(self.lora_A(xd)).to(y.dtype), alpha=self.scaling)
        update = self.lora_B(self.lora_A(xd)) * self.scaling
        scale = m / self._weight_norm(self.delta_weight().detach()).detach()  # (out,)
        if isinstance(self.lora_dropout, nn.Identity):
            bias = self.base_layer.bias
            wx = (y if bias is None else y - bias).to(a.dtype)
        else:
            wx = F.linear(xd, dense_weight(self.base_layer).to(a.dtype))
        return y + ((scale - 1) * wx + scale * update).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """Return ``scaling * B @ A`` in float32, shaped like the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge_(self) -> None:
        """Add the update into the base weight (in place); the LoRA branch is then skipped.

        With DoRA the weight becomes ``m * (W + s B A) / ||W + s B A||_row``."""
        refuse_quantized_merge(self.base_layer, "lora")
        if not self.merged:
            w = self.base_layer.weight
            new = w.float() + self.delta_weight()
            if self.lora_magnitude_vector is not None:
                self._merged_norm = torch.linalg.norm(new, dim=1)
                new = new * (self.lora_magnitude_vector.float() / self._merged_norm).unsqueeze(1)
            w.copy_(new.to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge_(self) -> None:
        """Undo merge_ (to float rounding): subtract the update, or with DoRA divide the row scale out."""
        if self.merged:
            w = self.base_layer.weight
            new = w.float()
            if self.lora_magnitude_vector is not None:  # rows were scaled by m / n, n kept at merge time
                new = new * (self._merged_norm / self.lora_magnitude_vector.float()).unsqueeze(1) - self.delta_weight()
            else:
                new = new - self.delta_weight()
            w.copy_(new.to(w.dtype))
            self.merged = False


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """Yield ``(name, layer)`` for every LoRA layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


@register_method
class LoraMethod(OwnedTensorsMethod):
    """LoRA on the linear layers that ``targets`` selects (see the module docstring)."""

    name = "lora"
    config_class = LoraConfig
    mergeable = True
    config: LoraConfig
    target_modules: list[str] | str = "all-linear"

    def attach(self, model: nn.Module) -> nn.Module:
        """Freeze the model and wrap every target linear layer in a LoraLinear; returns the model."""
        if any(True for _ in lora_layers(model)):
            raise DeltatuneError("this model already has LoRA layers; load a fresh base model")
        cfg = self.config
        targets = find_targets(model, cfg.targets, cfg.layers)
        self.target_modules = _peft_target_modules(model, targets, cfg.layers)
        freeze(model)
        for name in targets:
            layer = model.get_submodule(name)
            set_submodule(model, name, LoraLinear(layer, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.use_dora))
        unfreeze_heads(model)
        return model

    def owned_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Return the trainable tensors under their peft names (LoRA, DoRA magnitudes, heads)."""
        out: dict[str, torch.Tensor] = {}
        for name, layer in lora_layers(model):
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
            if layer.lora_magnitude_vector is not None:
                out[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
        out.update(head_parameters(model))
        return out



    def adapter_config(self, model: nn.Module, base_model: str) -> dict[str, Any]:
        """Return peft's LoraConfig fields, so peft and vLLM load the delta as it is."""
        cfg = self.config
        heads = head_names(model)
        return {
            "peft_type": "LORA",
            "task_type": "SEQ_CLS" if heads else "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "revision": None,
            "inference_mode": True,
            "r": cfg.r,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "target_modules": self.target_modules,
            "layers_to_transform": cfg.layers,
            "layers_pattern": None,
            "use_rslora": cfg.use_rslora,
            "use_dora": cfg.use_dora,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "modules_to_save": [h.split(".")[-1] for h in heads] or None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold every LoRA update into its base weight and put the plain nn.Linear back; returns the model."""
        for name, layer in list(lora_layers(model)):
            layer.merge_()
            set_submodule(model, name, layer.base_layer)
        return model

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[None]:
        """Within the block, skip every LoRA branch: the model computes as the base model."""
        layers = [layer for _, layer in lora_layers(model)]
        before = [layer.disabled for layer in layers]
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer, state in zip(layers, before, strict=True):
                layer.disabled = state


def _peft_target_modules(model: nn.Module, targets: list[str], layers: list[int] | None) -> list[str] | str:
    """Name ``targets`` as peft's ``target_modules``: leaf names (what peft and vLLM expect) when they
    select exactly these layers, else an exact regex of the full names."""
    leaves = sorted({n.split(".")[-1] for n in targets})
    if find_targets(model, leaves, layers) == targets:
        return leaves
    return "(" + "|".join(re.escape(n) for n in targets) + ")"


class QLoraConfig(LoraConfig):
    """QLoRA (Dettmers et al. 2023): LoRA on every linear layer of an NF4, double-quantized base, trained
    with paged 8-bit AdamW. Defaults are the paper's (r 64, alpha 16, dropout 0.1); the run options it
    needs are set by its presets (see ``deltatune.config.resolve_presets``)."""

    presets: ClassVar[dict[str, Any]] = {
        "model.quantize": "nf4", "model.double_quant": True, "train.optimizer": "paged_adamw_8bit"}

    name: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    """The fine-tuning method."""
    r: int = Field(default=64, ge=1, le=4096)
    """LoRA rank (the paper: 64)."""
    alpha: float = Field(default=16.0, gt=0)
    """Scaling numerator: the update is multiplied by alpha / r (the paper: 16)."""
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Dropout on the LoRA branch's input (the paper: 0.1 up to 13B parameters)."""


@register_method
class QLoraMethod(LoraMethod):
    """LoRA over a 4-bit base (see QLoraConfig); saved in peft's LoRA format like ``lora``."""

    name = "qlora"
    config_class = QLoraConfig
    config: QLoraConfig

    def attach(self, model: nn.Module) -> nn.Module:
        """Check that the base is 4-bit quantized, then attach LoRA to every target; returns the model."""
        spec = quantization_of(model)
        if not spec or spec["quantize"] not in ("nf4", "fp4"):
            raise ConfigError(
                "method qlora trains LoRA over a 4-bit base, but this model is "
                + (f"quantized to {spec['quantize']}" if spec else "not quantized")
                + "; load it with ModelConfig(quantize='nf4') (a run config with method.name=qlora does), "
                "or use method lora"
            )
        return super().attach(model)
