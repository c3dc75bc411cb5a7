"""(IA)^3: learned vectors that rescale keys, values and the feed-forward's inner activation.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning". For a key/value projection the output is rescaled, for the feed-forward's output projection
its input (the inner activation) is:

    k = l_k * (W_k x + b_k)        v = l_v * (W_v x + b_v)        y = W_2 (l_ff * f(W_1 x))

with every ``l`` initialised to ones, so the attached model computes exactly what the base computes.
Merging folds the vectors into the weights: rows (and bias) of W_k, W_v are scaled by ``l``; columns of
W_2 by ``l_ff``.

Saved in peft's IA3 format: ``base_model.model.<layer>.ia3_l`` shaped ``(out, 1)`` for a rescaled
output and ``(1, in)`` for a rescaled input, with ``target_modules`` / ``feedforward_modules`` in
``adapter_config.json`` (leaf names where they select exactly these layers in peft's matching, else an
exact regex of the full names), so ``peft.PeftModel.from_pretrained`` loads it unchanged.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

import torch
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
from deltatune.quantize import refuse_quantized_merge

_FFN_OUT = r".*\.(mlp\.(down_proj|fc2|dense_4h_to_h)|(layer|layers|h|blocks)\.\d+\.output\.dense)"


class IA3Config(MethodConfig):
    recommended_lr: ClassVar[tuple[float, float]] = (3e-3, 1.5e-2)
    name: Literal["ia3"] = "ia3"
    """The fine-tuning method."""
    targets: str | list[str] = r".*\.(k_proj|v_proj|key|value)|" + _FFN_OUT
    """Every rescaled layer, feed-forward ones included (as peft's target_modules): a list of layer names
    or a regex on full names. Default: keys, values and the feed-forward output projection."""
    feedforward_targets: str | list[str] = _FFN_OUT
    """Which of `targets` rescale their input (the feed-forward activation) instead of their output."""


class IA3Linear(nn.Module):
    """A frozen linear layer with a learned rescaling vector ``ia3_l`` of its output or input."""

    def __init__(self, base_layer: nn.Linear, feedforward: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.feedforward = feedforward
        shape = (1, base_layer.in_features) if feedforward else (base_layer.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base_layer.weight.device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.ia3_l.flatten()
        if self.feedforward:  # the scale takes the activations' dtype: a float32 master must not promote them
            return self.base_layer(x * scale.to(x.dtype))
        y = self.base_layer(x)
        return y * scale.to(y.dtype)

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """Scale the base weight's columns (feed-forward) or rows and bias by ``ia3_l``; return it."""
        refuse_quantized_merge(self.base_layer, "ia3")
        w, b = self.base_layer.weight, self.base_layer.bias
        scale = self.ia3_l.flatten().float()
        if self.feedforward:
            w.copy_((w.float() * scale.unsqueeze(0)).to(w.dtype))
        else:
            w.copy_((w.float() * scale.unsqueeze(1)).to(w.dtype))
            if b is not None:
                b.copy_((b.float() * scale).to(b.dtype))
        return self.base_layer


def ia3_layers(model: nn.Module) -> list[tuple[str, IA3Linear]]:
    """Return ``(name, layer)`` for every IA3 layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Linear)]


def _selects(spec: str | list[str], name: str, *, suffix_dot: bool = True) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    if suffix_dot:
        return any(name == t or name.endswith("." + t) for t in spec)
    return any(name.endswith(t) for t in spec)


def _peft_spec(all_names: list[str], chosen: list[str], *, suffix_dot: bool) -> list[str] | str:
    """Name ``chosen`` for peft: leaf names when peft's list matching selects exactly ``chosen`` among
    ``all_names``, else an exact regex of the full names."""
    leaves = sorted({n.split(".")[-1] for n in chosen})
    if [n for n in all_names if _selects(leaves, n, suffix_dot=suffix_dot)] == chosen:
        return leaves
    return "(" + "|".join(re.escape(n) for n in chosen) + ")"


@register_method
class IA3Method(OwnedTensorsMethod):
    """(IA)^3 (see the module docstring)."""

    name = "ia3"
    config_class = IA3Config
    mergeable = True
    config: IA3Config

    def attach(self, model: nn.Module) -> nn.Module:
        """Freeze the model and wrap every target in an IA3Linear (vectors of ones); returns the model."""
        if ia3_layers(model):
            raise DeltatuneError("this model already has IA3 layers; load a fresh base model")
        cfg = self.config
        targets = find_targets(model, cfg.targets)
        if cfg.feedforward_targets and not isinstance(cfg.feedforward_targets, str):
            unknown = [t for t in cfg.feedforward_targets if not any(_selects([t], n) for n in targets)]
            if unknown:
                raise ConfigError(f"method.feedforward_targets: {unknown} are not among method.targets")
        freeze(model)
        for name in targets:
            ff = bool(cfg.feedforward_targets) and _selects(cfg.feedforward_targets, name)
            set_submodule(model, name, IA3Linear(model.get_submodule(name), ff))
        unfreeze_heads(model)
        return model

    def owned_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {f"{PEFT_PREFIX}{n}.ia3_l": m.ia3_l for n, m in ia3_layers(model)}
        out.update(head_parameters(model))
        return out



    def adapter_config(self, model: nn.Module, base_model: str) -> dict[str, Any]:
        """Return peft's IA3Config fields, so peft loads the delta as it is."""
        layers = ia3_layers(model)
        names = [n for n, _ in layers]
        linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, IA3Linear))]
        ff = [n for n, m in layers if m.feedforward]
        heads = head_names(model)
        return {
            "peft_type": "IA3",
            "task_type": "SEQ_CLS" if heads else "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "revision": None,
            "inference_mode": True,
            "target_modules": _peft_spec(linear, names, suffix_dot=True),
            # peft matches a list of feedforward_modules with a plain endswith, among the targets
            "feedforward_modules": _peft_spec(names, ff, suffix_dot=False) if ff else [],
            "exclude_modules": None,
            "fan_in_fan_out": False,
            "init_ia3_weights": True,
            "modules_to_save": [h.split(".")[-1] for h in heads] or None,
        }

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold every vector into its weights and put the plain nn.Linear back; returns the model."""
        for name, layer in ia3_layers(model):
            set_submodule(model, name, layer.fold())
        return model
