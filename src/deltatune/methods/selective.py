"""Selective methods: train a chosen subset of the model's own parameters, add nothing that stays.

``freeze``: train only the top k transformer blocks (the last ``layers`` blocks), and/or modules chosen
by name or regex; every other weight stays frozen. The classic "freeze the bottom" baseline.

``bitfit`` (Ben Zaken, Ravfogel, Goldberg 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models"): train only the bias terms,

    y = W x + b'        W frozen, b' = b + delta_b trained

Models without biases (Llama) get a zero bias on every selected linear layer (an exact no-op until
trained), so the method applies to them too; merging keeps those biases as ordinary parameters and sets
the config flags (``attention_bias`` / ``mlp_bias``) that let transformers load them, where the
architecture has such flags.

Both save exactly the trained tensors under ``base_model.model.<name>`` with their own ``peft_type``
(``FREEZE``, ``BITFIT``) and a ``deltatune`` block; a classification head trains and is saved with them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from deltatune.config import MethodConfig
from deltatune.errors import ConfigError
from deltatune.methods.base import (
    FFN_LINEAR,
    PEFT_PREFIX,
    OwnedTensorsMethod,
    base_modules,
    block_names,
    find_targets,
    freeze,
    match_modules,
    output_layer_names,
    register_method,
    trainable_parameters,
    unfreeze_heads,
)
from deltatune.quantize import is_quantized_layer

ATTENTION = r".*\.(self_attn|attention|attn|self_attention)\..*"
"""Regex of the modules inside an attention block (Llama ``self_attn``, BERT ``attention``)."""


def _own(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{PEFT_PREFIX}{n}": p for n, p in trainable_parameters(model).items()}


class _OwnTensorsMethod(OwnedTensorsMethod):
    """A method whose trainable state is a subset of the model's own parameters, saved by name."""

    peft_type = ""

    def owned_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Return every trainable parameter under ``base_model.model.<name>``."""
        return dict(_own(model))

    def remember_base(self, model: nn.Module) -> None:
        """Keep a copy of the base values of the parameters this method trains (called at the end of attach):
        what :meth:`disabled` puts back. As large as the delta."""
        base = {id(p) for _, m in base_modules(model) for p in m.parameters(recurse=False)}  # not another method's
        self._base_values = {k: p.detach().clone() for k, p in _own(model).items() if id(p) in base}

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[None]:
        """Within the block the trained parameters hold their base values (copied at attach); after it, their
        trained values again."""
        live = _own(model)  # in a composition also the other methods' tensors: only this method's are swapped
        own = {k: live[k] for k in self._base_values if k in live}
        trained = {k: p.detach().clone() for k, p in own.items()}
        try:
            with torch.no_grad():
                for k, p in own.items():
                    p.copy_(self._base_values[k])
            yield
        finally:
            with torch.no_grad():
                for k, p in own.items():
                    p.copy_(trained[k])


class FreezeConfig(MethodConfig):
    recommended_lr: ClassVar[tuple[float, float]] = (1e-4, 5e-4)
    name: Literal["freeze"] = "freeze"
    """The fine-tuning method."""
    layers: int = Field(default=2, ge=0)
    """Train the last k transformer blocks (0: none, only `modules`)."""
    modules: str | list[str] | None = None
    """Also train these modules: names matched as the last part(s) of a module's name (`norm`,
    `embed_tokens`), or a regex on full names."""


@register_method
class FreezeMethod(_OwnTensorsMethod):
    """Train the top ``layers`` blocks and the named ``modules`` (see the module docstring)."""

    name = "freeze"
    config_class = FreezeConfig
    mergeable = True
    peft_type = "FREEZE"
    config: FreezeConfig

    def attach(self, model: nn.Module) -> nn.Module:
        """Freeze the model, then unfreeze the chosen blocks, modules and any classifier head."""
        cfg = self.config
        blocks = block_names(model)
        if cfg.layers > len(blocks):
            raise ConfigError(f"method.layers: {cfg.layers} but the model has {len(blocks)} blocks")
        chosen = blocks[len(blocks) - cfg.layers:] if cfg.layers else []
        if cfg.modules is not None:
            chosen += match_modules(model, cfg.modules)
        quantized = [n for n in chosen for m in model.get_submodule(n).modules() if is_quantized_layer(m)]
        if quantized:
            raise ConfigError(f"method freeze cannot train {quantized[0]}: its weights are stored as 4/8-bit codes "
                              "that take no gradient step; train only unquantized modules (method.layers=0 "
                              "method.modules=norm), use lora, or load the base unquantized (model.quantize=none)")
        freeze(model)
        for name in chosen:
            model.get_submodule(name).requires_grad_(True)
        unfreeze_heads(model)
        self.remember_base(model)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """Return the model: the trained weights already are its weights."""
        return model


class BitFitConfig(MethodConfig):
    recommended_lr: ClassVar[tuple[float, float]] = (1e-3, 5e-3)
    name: Literal["bitfit"] = "bitfit"
    """The fine-tuning method."""
    biases: Literal["all", "attention", "mlp"] = "all"
    """Which biases train: `all` (every bias, norms included), only the attention layers', or only the
    feed-forward layers'."""
    add_missing: bool = True
    """Give selected linear layers that have no bias a zero bias that trains (Llama has none)."""


@register_method
class BitFitMethod(_OwnTensorsMethod):
    """Train bias terms only (see the module docstring)."""

    name = "bitfit"
    config_class = BitFitConfig
    mergeable = True
    peft_type = "BITFIT"
    config: BitFitConfig

    def __init__(self, config: MethodConfig) -> None:
        super().__init__(config)
        self.added: list[str] = []

    def _selected(self, model: nn.Module) -> list[str]:
        """Return the names of the modules whose biases train."""
        skip = output_layer_names(model)
        names = [n for n, _ in base_modules(model) if n and n not in skip]
        if self.config.biases == "attention":
            return [n for n in names if re.fullmatch(ATTENTION, n)]
        if self.config.biases == "mlp":
            return [n for n in names if re.fullmatch(FFN_LINEAR, n)]
        return names

    def attach(self, model: nn.Module) -> nn.Module:
        """Freeze the model, add zero biases where selected linear layers lack one, unfreeze every selected
        bias (and a classifier head)."""
        freeze(model)
        linear = set(find_targets(model, "all-linear"))
        for name in self._selected(model):
            module = model.get_submodule(name)
            bias = getattr(module, "bias", None)
            if bias is None and name in linear and self.config.add_missing:
                w = module.weight  # a quantized layer's weight holds packed codes: size and dtype from elsewhere
                dtype = w.dtype if w.dtype.is_floating_point else getattr(module, "compute_dtype", None)
                module.bias = nn.Parameter(torch.zeros(module.out_features, device=w.device,
                                                       dtype=dtype or torch.float32))
                self.added.append(name)
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)
        unfreeze_heads(model)
        if not trainable_parameters(model):
            raise ConfigError(f"method.biases: {self.config.biases!r} selects no bias of this model; "
                              "set add_missing: true or choose other biases")
        self.remember_base(model)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """Return the model (biases are plain weights); mark added biases in the model config so a saved
        merged model reloads with them."""
        config = getattr(model, "config", None)
        for name in self.added:
            attention = re.fullmatch(ATTENTION, name) is not None
            flag = "attention_bias" if attention else "mlp_bias"
            if config is not None and hasattr(config, flag):
                setattr(config, flag, True)
        return model
