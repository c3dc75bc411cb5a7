"""Several methods on one model: ``method: [{name: lora, r: 8}, {name: bitfit}]`` (or ``name: compose``).

Each method attaches in turn, in the order given; a later method never targets what an earlier one
added (only the base model's own modules, see ``base_modules``). The trainable state is the union of
what each method trains, the saved delta the union of their tensors, and merge folds each mergeable
method back in reverse order. Combinations that make no sense are refused at config time: `full`
(it already trains everything), a method twice, or two prompt methods (both would own the input).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Literal

import torch
from pydantic import SerializeAsAny, field_validator
from torch import nn

from deltatune.config import MethodConfig
from deltatune.errors import DeltatuneError
from deltatune.methods.base import (
    Method,
    RateSwitch,
    build_method,
    deltatune_adapter_config,
    method_config_class,
    register_method,
    trainable_parameters,
)

PROMPT_METHODS = {"prompt_tuning", "p_tuning", "prefix_tuning"}


class ComposeConfig(MethodConfig):
    name: Literal["compose"] = "compose"
    """The fine-tuning method."""
    methods: list[SerializeAsAny[MethodConfig]]
    """The methods to stack, in attach order, each a method section such as {name: lora, r: 8}."""

    @field_validator("methods", mode="before")
    @classmethod
    def _validate_each(cls, value: Any) -> list[MethodConfig]:
        if not isinstance(value, list) or len(value) < 2:
            raise ValueError("give a list of at least two methods, e.g. [{name: lora}, {name: bitfit}]")
        configs = []
        for i, item in enumerate(value):
            data = item.model_dump() if isinstance(item, MethodConfig) else item
            if not isinstance(data, dict) or "name" not in data:
                raise ValueError(f"item {i} must be a method section with a name, e.g. {{name: lora}}")
            configs.append(method_config_class(str(data["name"])).model_validate(data))
        names = [c.name for c in configs]
        if "full" in names:
            raise ValueError("`full` trains every weight already; it cannot be combined with another method")
        if "compose" in names:
            raise ValueError("a compose method cannot hold another compose method; list the methods flat")
        if len(set(names)) != len(names):
            raise ValueError(f"a method appears twice in {names}; merge their options into one entry")
        if len(PROMPT_METHODS & set(names)) > 1:
            raise ValueError("two prompt methods would both own the input; keep one of "
                             f"{sorted(PROMPT_METHODS & set(names))}")
        return configs

    def default_lr(self, task: str) -> float:
        """Return the first method's recommended learning rate (the others train at the same rate)."""
        return self.methods[0].default_lr(task)


@register_method
class ComposeMethod(Method):
    """Several methods attached to one model (see the module docstring)."""

    name = "compose"
    config_class = ComposeConfig
    mergeable = True
    peft_type = "COMPOSE"
    config: ComposeConfig

    def __init__(self, config: MethodConfig) -> None:
        super().__init__(config)
        self.parts = [build_method(c) for c in self.config.methods]
        self.packed_attention = all(p.packed_attention for p in self.parts)  # type: ignore[misc]

    def attach(self, model: nn.Module) -> nn.Module:
        """Attach every method in order; the union of what each trains stays trainable. Returns the model."""
        trainable: dict[str, nn.Parameter] = {}
        for part in self.parts:
            part.attach(model)  # each method freezes the model first, so collect as we go
            trainable.update(trainable_parameters(model))
        by_id = {id(p) for p in trainable.values()}
        for p in model.parameters():
            p.requires_grad_(id(p) in by_id)
        return model

    def delta_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Return the union of every method's tensors (a shared classifier head appears once)."""
        out: dict[str, torch.Tensor] = {}
        for part in self.parts:
            for key, value in part.delta_state_dict(model).items():
                if key in out and out[key].data_ptr() != value.data_ptr():
                    raise DeltatuneError(f"methods {[p.name for p in self.parts]} both save {key}; "
                                         "they cannot be combined on this model")
                out[key] = value
        return out

    def load_delta_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Give each method the tensors it owns; raise DeltatuneError on a missing or unknown name."""
        claimed: set[str] = set()
        for part in self.parts:
            own = set(part.delta_state_dict(model))
            part.load_delta_state_dict(model, {k: v for k, v in tensors.items() if k in own})
            claimed |= own
        extra = sorted(set(tensors) - claimed)
        if extra:
            raise DeltatuneError(f"the compose delta has tensors no method owns: {extra[:3]}; "
                                 "was it trained with other methods?")

    def adapter_config(self, model: nn.Module, base_model: str) -> dict[str, Any]:
        """Return the deltatune adapter config, listing every method's config."""
        return deltatune_adapter_config(self, model, base_model, self.peft_type)

    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        """Return the sum of the methods' loss terms, or None when none has one."""
        terms = [t for t in (p.regularization(model) for p in self.parts) if t is not None]
        return torch.stack(terms).sum() if terms else None

    def learning_rates(self, model: nn.Module, lr: float) -> dict[str, float]:
        """Return the union of the methods' own learning rates."""
        out: dict[str, float] = {}
        for part in self.parts:
            out.update(part.learning_rates(model, lr))
        return out

    def rate_switches(self, model: nn.Module, lr: float, total_steps: int) -> dict[str, RateSwitch]:
        """Return the union of the methods' rate switches."""
        out: dict[str, RateSwitch] = {}
        for part in self.parts:
            out.update(part.rate_switches(model, lr, total_steps))
        return out

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Call every method's after_step."""
        for part in self.parts:
            part.after_step(model, step, total_steps)

    def finalize(self, model: nn.Module) -> None:
        """Call every method's finalize."""
        for part in self.parts:
            part.finalize(model)

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold every method into the weights, last attached first; raise if one cannot merge."""
        stuck = [p.name for p in self.parts if not p.mergeable]
        if stuck:
            raise DeltatuneError(f"compose cannot be merged: {', '.join(stuck)} cannot be merged into the weights")
        for part in reversed(self.parts):
            model = part.merge(model)
        return model

    @contextmanager
    def disabled(self, model: nn.Module) -> Iterator[None]:
        """Within the block every method is switched off: the model computes as the base model."""
        with ExitStack() as stack:
            for part in self.parts:
                stack.enter_context(part.disabled(model))
            yield
