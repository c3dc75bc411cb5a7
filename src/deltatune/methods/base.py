"""The Method contract and the helpers every method shares: target discovery and freezing.

A method is a pydantic config plus three verbs (see docs/architecture.md):

- ``attach(model)``: freeze the base, insert or unfreeze what the method trains; outputs stay equal to
  the base model's (identity initialisation) unless the method changes the input by design.
- the trainable state is exactly the parameters with ``requires_grad``; ``delta_state_dict`` names them
  as they are written to ``adapter_model.safetensors``.
- ``merge(model)``: fold the delta into plain weights (same outputs, no extra modules) or raise.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.config import MethodConfig, register_method_config
from deltatune.config import method_config_class as config_class_of
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.modules import ADDED, base_modules, mark_added, output_layer_names


@dataclass(frozen=True)
class RateSwitch:
    """From optimizer step ``at_step`` (0-based) on, a parameter trains at peak rate ``rate`` (the run's
    warmup and decay curve still applies)."""

    at_step: int
    rate: float


class Method(ABC):
    """One fine-tuning method bound to its validated config."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    mergeable: ClassVar[bool] = False
    packed_attention: ClassVar[bool] = True
    """False for methods that put keys/values before the input (prompt methods): a packed row then needs
    the block mask, since every example must also see those columns."""

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    @abstractmethod
    def attach(self, model: nn.Module) -> nn.Module:
        """Freeze the base and add the method's trainable parts; return the model (changed in place)."""

    @abstractmethod
    def delta_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Return the trained tensors under the names they have in ``adapter_model.safetensors``."""

    @abstractmethod
    def load_delta_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors into an attached model; raise DeltatuneError on a missing or extra name."""

    @abstractmethod
    def adapter_config(self, model: nn.Module, base_model: str) -> dict[str, Any]:
        """Return the ``adapter_config.json`` content for this method on this model."""

    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        """Return a term added to every step's loss (e.g. diff pruning's L0 penalty), or None."""
        return None

    def learning_rates(self, model: nn.Module, lr: float) -> dict[str, float]:
        """Return ``{parameter name: peak learning rate}`` for parameters that should not train at the run's
        rate ``lr`` (e.g. diff pruning's gate logits); empty by default."""
        return {}

    def rate_switches(self, model: nn.Module, lr: float, total_steps: int) -> dict[str, RateSwitch]:
        """Return ``{parameter name: RateSwitch}`` for parameters whose peak rate changes at a step of a run of
        ``total_steps`` (e.g. diff pruning's kept entries after pruning); empty by default."""
        return {}

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called after every optimizer step (e.g. to re-apply a sparsity mask)."""
        return None

    def finalize(self, model: nn.Module) -> None:
        """Called once when training ends, before the delta is saved (e.g. to prune to a target sparsity)."""
        return None

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the delta into the base weights and remove the method's modules; return the model."""
        raise DeltatuneError(f"method {self.name!r} cannot be merged into the weights; use it unmerged")

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[None]:
        """Within the block, the model computes as the base model (the reference model of preference tuning,
        the base figures of an evaluation); after it, as before. This default puts every layer the method
        wrapped back to its base layer for the block (all of a method's layers keep theirs as ``base_layer``);
        methods that change base weights in place override it."""
        swapped: list[tuple[nn.Module, str, nn.Module]] = []
        try:
            while (found := _outer_wrapper(model)) is not None:
                name, wrapper = found
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, wrapper.base_layer)
                swapped.append((parent, child, wrapper))
            yield
        finally:
            for parent, child, wrapper in reversed(swapped):
                setattr(parent, child, wrapper)


_REGISTRY: dict[str, type[Method]] = {}


def _outer_wrapper(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first module a method added that wraps a base layer (``base_layer``), with its name; None if none."""
    for name, module in model.named_modules():
        if name and getattr(module, ADDED, False) and isinstance(getattr(module, "base_layer", None), nn.Module):
            return name, module
    return None


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``method.name: <cls.name>``; names must be unique."""
    if cls.name in _REGISTRY:
        raise RuntimeError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    register_method_config(cls.name, cls.config_class)
    return cls


def registered_methods() -> dict[str, type[MethodConfig]]:
    """Return ``{method name: config class}`` for every registered method."""
    return {name: cls.config_class for name, cls in _REGISTRY.items()}


def method_class(name: str) -> type[Method]:
    """Return the Method class registered as ``name``; raise ConfigError listing the known names."""
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(f"method.name: unknown method {name!r}; choose one of: {known}")
    return _REGISTRY[name]


def method_config_class(name: str) -> type[MethodConfig]:
    """Return the config class of method ``name`` (for validating the `method` section); raise ValueError
    listing the known names."""
    return config_class_of(name)


def build_method(config: MethodConfig) -> Method:
    """Return the Method instance for a validated method config."""
    return method_class(config.name)(config)


# ----------------------------------------------------------------------------------------------------
# target discovery and freezing


def _layer_index(name: str) -> int | None:
    match = re.search(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.", f".{name}.")
    return int(match.group(1)) if match else None


def find_targets(
    model: nn.Module,
    targets: str | list[str],
    layers: list[int] | None = None,
    kinds: tuple[type[nn.Module], ...] = (nn.Linear,),
) -> list[str]:
    """Return the names of the modules that ``targets`` selects, in model order.

    ``targets`` is ``"all-linear"`` (every linear layer except the output head), a regex matched against
    the whole qualified name, or a list of names matched as the last part(s) of the qualified name
    (``q_proj`` matches ``model.layers.0.self_attn.q_proj``). ``layers`` keeps only those block indices.
    Raises ConfigError when nothing matches, naming what the model has.
    """
    skip = output_layer_names(model)
    chosen: list[str] = []
    for name, module in base_modules(model):
        if not isinstance(module, kinds) or name in skip:
            continue
        if targets == "all-linear":
            ok = True
        elif isinstance(targets, str):
            ok = re.fullmatch(targets, name) is not None
        else:
            ok = any(name == t or name.endswith("." + t) for t in targets)
        if ok and layers is not None:
            ok = _layer_index(name) in set(layers)
        if ok:
            chosen.append(name)
    if not chosen:
        leaf_names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, kinds)})
        raise ConfigError(
            f"method.targets: {targets!r} matches no layer of this model; its linear layers are named "
            f"{', '.join(leaf_names)} (or use all-linear)"
        )
    return chosen


def freeze(model: nn.Module) -> None:
    """Set ``requires_grad=False`` on every parameter of ``model``."""
    for p in model.parameters():
        p.requires_grad_(False)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` with ``new``, which takes the old one's train/eval mode.

    Everything ``new`` brings beyond the old module is marked as added (see :func:`mark_added`); putting
    a base module back (at merge) clears nothing, since base modules were never marked.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    new.train(old.training)
    if not any(new is m for m in old.modules()):  # not putting a wrapped base module back
        mark_added(new, keep=old)
    setattr(parent, child, new)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Return ``{name: parameter}`` for every parameter that requires a gradient."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------------
# helpers shared by every method: heads, delta names, checked loading, the config of non-peft methods

PEFT_PREFIX = "base_model.model."
"""peft names every saved tensor after the wrapped model's own names under this prefix."""

FFN_LINEAR = r".*\.(mlp|feed_forward|ffn)\.[^.]+|.*\.(layer|layers|h|blocks)\.\d+\.(intermediate|output)\.dense"
"""Regex of the feed-forward linear layers: Llama-style ``mlp.*`` and BERT-style ``intermediate.dense`` /
``output.dense`` (not ``attention.output.dense``)."""


def head_names(model: nn.Module) -> list[str]:
    """Return the names of a sequence classifier's freshly initialised head(s), which train beside every
    method (peft's ``modules_to_save``); empty for a causal LM."""
    config = getattr(model, "config", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if getattr(config, "num_labels", None) is None or (callable(get_out) and get_out() is not None):
        return []
    return sorted(n for n in output_layer_names(model) if n)


def unfreeze_heads(model: nn.Module) -> None:
    """Give every classification head ``requires_grad=True`` (no-op for a causal LM)."""
    for head in head_names(model):
        model.get_submodule(head).requires_grad_(True)


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Return ``{saved name: parameter}`` for the classification head(s), named as peft saves them."""
    out: dict[str, nn.Parameter] = {}
    for head in head_names(model):
        for pname, p in model.get_submodule(head).named_parameters():
            out[f"{PEFT_PREFIX}{head}.{pname}"] = p
    return out


def copy_checked(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], method: str) -> None:
    """Copy ``tensors[name]`` into ``own[name]`` for every name; raise DeltatuneError when the names or
    shapes of the two differ (a delta of another model, method or config)."""
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    if missing or extra:
        raise DeltatuneError(
            f"the {method} delta does not fit this model: "
            + (f"missing {missing[:3]}{'...' if len(missing) > 3 else ''} " if missing else "")
            + (f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}" if extra else "")
            + "; was it trained on another base model or with other targets?"
        )
    with torch.no_grad():
        for key, param in own.items():
            value = tensors[key]
            if value.shape != param.shape:
                raise DeltatuneError(
                    f"the delta's {key} has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}; "
                    "was it trained with another config or base model?"
                )
            param.copy_(value.to(param.dtype))


def deltatune_adapter_config(method: Method, model: nn.Module, base_model: str, peft_type: str) -> dict[str, Any]:
    """Return ``adapter_config.json`` for a method peft does not have: peft's common fields, the method's
    own ``peft_type`` and a ``deltatune`` block with the whole method config."""
    heads = head_names(model)
    return {
        "peft_type": peft_type,
        "task_type": "SEQ_CLS" if heads else "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "modules_to_save": [h.split(".")[-1] for h in heads] or None,
        "deltatune": {"method": method.config.model_dump(mode="json")},
    }


class OwnedTensorsMethod(Method):
    """A method whose delta is exactly the live tensors :meth:`owned_tensors` names (most methods):
    saving detaches them, loading copies into them with names and shapes checked, and the adapter
    config is deltatune's own with ``peft_type`` (methods in peft's format override it)."""

    peft_type: ClassVar[str] = ""

    @abstractmethod
    def owned_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Return ``{saved name: live tensor}`` for everything the method saves (a classifier head too)."""

    def delta_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Return the owned tensors, detached, under their saved names."""
        return {k: v.detach() for k, v in self.owned_tensors(model).items()}

    def load_delta_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors into the attached model; raise DeltatuneError if names or shapes disagree."""
        copy_checked(self.owned_tensors(model), tensors, self.name)

    def adapter_config(self, model: nn.Module, base_model: str) -> dict[str, Any]:
        """Return deltatune's adapter config with this method's ``peft_type`` and config block."""
        return deltatune_adapter_config(self, model, base_model, self.peft_type)


def match_modules(model: nn.Module, spec: str | list[str], kinds: tuple[type[nn.Module], ...] = (nn.Module,)
                  ) -> list[str]:
    """Return the names of the modules of type ``kinds`` that ``spec`` selects, in model order: a regex
    matched against the whole name, or a list of names matched as the last part(s) of the name. Raises
    ConfigError when nothing matches."""
    chosen = []
    for name, module in base_modules(model):
        if not name or not isinstance(module, kinds):
            continue
        if isinstance(spec, str):
            ok = re.fullmatch(spec, name) is not None
        else:
            ok = any(name == t or name.endswith("." + t) for t in spec)
        if ok:
            chosen.append(name)
    if not chosen:
        raise ConfigError(f"method: {spec!r} matches no module of this model (names look like "
                          f"{', '.join(n for n, _ in list(model.named_modules())[1:6])}, ...)")
    return chosen


def block_names(model: nn.Module) -> list[str]:
    """Return the names of the transformer blocks (``model.layers.0`` ...), in order."""
    return [n for n, _ in model.named_modules() if re.fullmatch(r"(.*\.)?(layers|layer|h|blocks|block)\.\d+", n)]
