"""Sparse methods: a sparse update of the frozen pre-trained weights, saved as indices + values.

``diff_pruning`` (Guo, Rush, Kim 2021, "Parameter-Efficient Transfer Learning with Diff Pruning"): each
target weight gets a task diff ``delta = z * w`` with a dense ``w`` (init 0) and a gate ``z`` drawn from
the hard-concrete distribution (Louizos et al. 2018) with a trainable ``log_alpha`` per entry:

    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),  z = clamp(s (r - l) + l, 0, 1)
    W' = W + z * w          penalty = l0_strength * sum sigmoid(log_alpha - beta log(-l / r))

with the paper's ``l = -1.5``, ``r = 1.5``, ``beta = 1``; the penalty is the expected number of non-zero
gates (the differentiable L0 norm). At eval ``z = clamp(sigmoid(log_alpha) (r - l) + l, 0, 1)``. As in the
paper's recipe, training has two phases: after ``prune_at`` of the steps, ``z * w`` is magnitude-pruned
globally to the target ``sparsity`` (the projection onto the L0 ball), the gates are fixed open, and the
surviving entries go on training under that fixed mask for the remaining steps ("fixed-mask
fine-tuning"); ``finalize`` prunes at the end if the run stopped earlier. The dense diff trains at
``train.lr`` (a full fine-tuning rate: it is added to the weights as they are), the gate logits at
``gate_lr`` (they must move by several units for the L0 penalty to close gates); after pruning the kept
entries train at ``fixed_mask_lr_scale`` times ``train.lr``. Why: in a short run the gates barely close
(the penalty's gradient per entry is far below Adam's epsilon until thousands of steps have passed), so
pruning to 0.5% removes most of what the dense phase learned, and at the dense rate the kept entries
cannot win it back (MiniLM on SST-2, 200 steps: 81.5% before pruning, 51.1% at the end at 1x, 68.7% at
20x, 81.1% at 50x). The paper's structured (group) penalty is
not implemented. ``w = 0`` at attach, so the model computes exactly what the base computes.

``pafi`` (Liao, Meng, Monz 2023, "Parameter-Efficient Fine-Tuning without Introducing New Latency"): a
data-free mask, shared by every task, of the pre-trained weights with the smallest absolute value; only
those entries train:

    W' = W + scatter(indices, values)        indices = the (1 - sparsity) smallest |W|,  values init 0

The paper ranks weights by magnitude across the whole model; ``scope: global`` does that (the default),
``scope: per_matrix`` takes the same fraction from each matrix. Both methods save
``base_model.model.<layer>.<kind>_indices`` (int64 flat indices into the weight) and ``<kind>_values``
and merge by adding the values into the weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from deltatune.config import MethodConfig
from deltatune.errors import DeltatuneError
from deltatune.methods.base import (
    PEFT_PREFIX,
    Method,
    OwnedTensorsMethod,
    RateSwitch,
    copy_checked,
    deltatune_adapter_config,
    find_targets,
    freeze,
    head_parameters,
    register_method,
    set_submodule,
    unfreeze_heads,
)
from deltatune.quantize import refuse_quantized

L_LOW, R_HIGH, BETA = -1.5, 1.5, 1.0
OPEN_GATE = 100.0  # log_alpha at which the eval gate is exactly 1 in float32


class DiffPruningConfig(MethodConfig):
    recommended_lr: ClassVar[tuple[float, float]] = (1e-4, 1e-4)
    name: Literal["diff_pruning"] = "diff_pruning"
    """The fine-tuning method."""
    sparsity: float = Field(default=0.995, ge=0.0, lt=1.0)
    """Fraction of the diff's entries that are zero after training (0.995: 0.5% of the weights change)."""
    l0_strength: float = Field(default=1.25e-7, ge=0.0)
    """Weight of the expected-L0 penalty added to the loss (the paper's lambda)."""
    init_log_alpha: float = 5.0
    """Initial gate logit: high values start with every gate open."""
    gate_lr: float = Field(default=0.01, gt=0)
    """Peak learning rate of the gate logits (the diff itself trains at train.lr)."""
    prune_at: float = Field(default=0.5, gt=0, le=1)
    """Fraction of the steps after which the diff is pruned to `sparsity`; the kept entries then train
    under the fixed mask for the rest (1.0: prune only at the end)."""
    fixed_mask_lr_scale: float = Field(default=50.0, gt=0)
    """After pruning, the kept entries train at this multiple of the diff's rate: a sparse update needs
    larger steps per entry than a dense one (as pafi's rates show), and it must win back what pruning took."""
    targets: str | list[str] = "all-linear"
    """`all-linear`, a list of layer names, or a regex on full names."""


class DiffLinear(nn.Module):
    """A frozen linear layer plus a hard-concrete-gated diff (see the module docstring)."""

    def __init__(self, base_layer: nn.Linear, init_log_alpha: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        w = base_layer.weight
        self.diff = nn.Parameter(torch.zeros(w.shape, device=w.device, dtype=torch.float32))
        self.log_alpha = nn.Parameter(torch.full(w.shape, init_log_alpha, device=w.device, dtype=torch.float32))
        self.mask: torch.Tensor | None = None  # set by pruning: the fixed mask of the kept entries

    def gate(self) -> torch.Tensor:
        """Return ``z``: a hard-concrete sample in training, its deterministic value in eval."""
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / BETA)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (R_HIGH - L_LOW) + L_LOW).clamp(0.0, 1.0)

    def delta(self) -> torch.Tensor:
        """Return the diff ``z * w`` (float32, shaped like the weight); after pruning, the masked ``w``."""
        if self.mask is not None:
            return self.diff * self.mask
        return self.gate() * self.diff

    def expected_l0(self) -> torch.Tensor:
        """Return the expected number of non-zero gates."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-L_LOW / R_HIGH)).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base_layer.weight
        return F.linear(x, w + self.delta().to(w.dtype), self.base_layer.bias)


class PafiConfig(MethodConfig):
    recommended_lr: ClassVar[tuple[float, float]] = (1e-3, 5e-3)
    name: Literal["pafi"] = "pafi"
    """The fine-tuning method."""
    sparsity: float = Field(default=0.995, ge=0.0, lt=1.0)
    """Fraction of the target weights that stay frozen (0.995: the 0.5% smallest train)."""
    scope: Literal["global", "per_matrix"] = "global"
    """Rank weights by magnitude across all targets (the paper), or within each matrix."""
    targets: str | list[str] = "all-linear"
    """`all-linear`, a list of layer names, or a regex on full names."""


class SparseLinear(nn.Module):
    """A frozen linear layer whose entries at fixed ``indices`` get trainable offsets ``values``."""

    def __init__(self, base_layer: nn.Linear, indices: torch.Tensor) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.register_buffer("indices", indices.to(base_layer.weight.device))
        self.values = nn.Parameter(torch.zeros(indices.numel(), device=base_layer.weight.device))

    def delta(self) -> torch.Tensor:
        """Return the dense update (float32, shaped like the weight)."""
        w = self.base_layer.weight
        flat = torch.zeros(w.numel(), device=w.device, dtype=self.values.dtype)
        return flat.index_add(0, self.indices, self.values).view(w.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base_layer.weight
        return F.linear(x, w + self.delta().to(w.dtype), self.base_layer.bias)


def _layers(model: nn.Module, kind: type[nn.Module]) -> Iterator[tuple[str, Any]]:
    for name, module in model.named_modules():
        if isinstance(module, kind):
            yield name, module


def _wrap(model: nn.Module, targets: str | list[str], make: Any, kind: type[nn.Module]) -> list[str]:
    if any(True for _ in _layers(model, kind)):
        raise DeltatuneError(f"this model already has {kind.__name__} layers; load a fresh base model")
    names = find_targets(model, targets)
    freeze(model)
    for name in names:
        set_submodule(model, name, make(name, model.get_submodule(name)))
    unfreeze_heads(model)
    return names


@torch.no_grad()
def _merge(model: nn.Module, kind: type[nn.Module]) -> nn.Module:
    for name, layer in list(_layers(model, kind)):
        w = layer.base_layer.weight
        w.copy_((w.float() + layer.delta()).to(w.dtype))
        set_submodule(model, name, layer.base_layer)
    return model


@register_method
class DiffPruningMethod(Method):
    """Diff pruning with the hard-concrete L0 relaxation (see the module docstring)."""

    name = "diff_pruning"
    config_class = DiffPruningConfig
    mergeable = True
    config: DiffPruningConfig

    def attach(self, model: nn.Module) -> nn.Module:
        """Freeze the model and give every target linear layer a gated diff; returns the model."""
        refuse_quantized(model, self.name, "its diff is added to each dense weight and pruned against it, and "
                         "a quantized base keeps no dense weights")
        _wrap(model, self.config.targets, lambda _n, m: DiffLinear(m, self.config.init_log_alpha), DiffLinear)
        return model

    def regularization(self, model: nn.Module) -> torch.Tensor | None:
        """Return ``l0_strength`` times the expected number of non-zero diff entries (None once pruned)."""
        layers = [layer for _, layer in _layers(model, DiffLinear)]
        if self.config.l0_strength == 0 or not layers or layers[0].mask is not None:
            return None
        return self.config.l0_strength * sum(layer.expected_l0() for layer in layers)

    def learning_rates(self, model: nn.Module, lr: float) -> dict[str, float]:
        """Return ``gate_lr`` for every gate logit."""
        return {f"{name}.log_alpha": self.config.gate_lr for name, _ in _layers(model, DiffLinear)}

    def rate_switches(self, model: nn.Module, lr: float, total_steps: int) -> dict[str, RateSwitch]:
        """Return the fixed-mask phase's rate (``fixed_mask_lr_scale`` x ``lr``) for every diff, from the first
        step after pruning; empty when pruning happens only at the end."""
        at = self.prune_step(total_steps) + 1
        if at >= total_steps:
            return {}
        switch = RateSwitch(at, lr * self.config.fixed_mask_lr_scale)
        return {f"{name}.diff": switch for name, _ in _layers(model, DiffLinear)}

    def prune_step(self, total_steps: int) -> int:
        """Return the 0-based step after which the diff is pruned (``prune_at`` of ``total_steps``)."""
        return max(round(self.config.prune_at * total_steps), 1) - 1

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Prune once ``prune_at`` of the steps are done; afterwards keep the pruned entries of the diff at
        zero (AdamW's momentum would otherwise move them), so the diff's non-zeros are the mask."""
        if step < self.prune_step(total_steps):
            return
        self.finalize(model)
        with torch.no_grad():
            for _, layer in _layers(model, DiffLinear):
                layer.diff.mul_(layer.mask)

    @torch.no_grad()
    def finalize(self, model: nn.Module) -> None:
        """Keep the largest ``1 - sparsity`` fraction of ``|z * w|`` over all layers, zero the rest, open
        every gate and fix the mask, so the diff is exactly the pruned one from now on. Idempotent; a model
        whose gates are already open (a resumed run) gets its mask back from the diff's non-zeros."""
        layers = [layer for _, layer in _layers(model, DiffLinear)]
        if not layers or layers[0].mask is not None:
            return
        if all(bool((layer.log_alpha == OPEN_GATE).all()) for layer in layers):
            for layer in layers:
                _fix_mask(layer, layer.diff != 0)
            return
        was = [layer.training for layer in layers]
        for layer in layers:
            layer.eval()
        deltas = [layer.delta() for layer in layers]
        flat = torch.cat([d.flatten().abs() for d in deltas])
        keep = round((1 - self.config.sparsity) * flat.numel())
        mask = torch.zeros_like(flat, dtype=torch.bool)
        if keep:
            mask[flat.topk(keep).indices] = True
        start = 0
        for layer, d, mode in zip(layers, deltas, was, strict=True):
            m = mask[start:start + d.numel()].view(d.shape)
            start += d.numel()
            layer.diff.copy_(d * m)
            layer.log_alpha.fill_(OPEN_GATE)
            _fix_mask(layer, m)
            layer.train(mode)

    def delta_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Return the eval diff ``z * w`` of every layer as flat indices + values of its non-zeros."""
        out: dict[str, torch.Tensor] = {}
        for name, layer in _layers(model, DiffLinear):
            was = layer.training
            layer.eval()
            with torch.no_grad():
                flat = layer.delta().flatten()
            layer.train(was)
            idx = flat.nonzero().flatten()
            out[f"{PEFT_PREFIX}{name}.diff_indices"] = idx
            out[f"{PEFT_PREFIX}{name}.diff_values"] = flat[idx]
        out.update({k: p.detach() for k, p in head_parameters(model).items()})
        return out

    @torch.no_grad()
    def load_delta_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Set each layer's diff to the saved sparse values with open gates; raise on a mismatch."""
        layers = dict(_layers(model, DiffLinear))
        want = {f"{PEFT_PREFIX}{n}.diff_{k}" for n in layers for k in ("indices", "values")}
        heads = head_parameters(model)
        copy_checked(heads, {k: v for k, v in tensors.items() if k not in want}, self.name)
        for name, layer in layers.items():
            idx, vals = (tensors.get(f"{PEFT_PREFIX}{name}.diff_{k}") for k in ("indices", "values"))
            if idx is None or vals is None:
                raise DeltatuneError(f"the diff_pruning delta has no tensors for {name}; "
                                     "was it trained with other targets?")
            _check_indices(idx, layer.diff.numel(), name)
            flat = torch.zeros(layer.diff.numel(), device=layer.diff.device)
            flat[idx.to(flat.device)] = vals.to(flat)
            layer.diff.copy_(flat.view(layer.diff.shape))
            layer.log_alpha.fill_(OPEN_GATE)

    def adapter_config(self, model: nn.Module, base_model: str) -> dict[str, Any]:
        """Return the config with ``peft_type: "DIFF_PRUNING"`` and the deltatune block."""
        return deltatune_adapter_config(self, model, base_model, "DIFF_PRUNING")

    def merge(self, model: nn.Module) -> nn.Module:
        """Add each eval diff into its weight and put the plain nn.Linear back; returns the model."""
        model.eval()
        return _merge(model, DiffLinear)


def _fix_mask(layer: DiffLinear, mask: torch.Tensor) -> None:
    """Fix ``layer``'s mask: from now on only the kept entries of the diff train, and the gates are frozen."""
    layer.mask = mask.to(layer.diff.dtype)
    layer.log_alpha.requires_grad_(False)
    layer.log_alpha.grad = None


def _check_indices(idx: torch.Tensor, size: int, name: str) -> None:
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
        raise DeltatuneError(f"the delta's indices for {name} fall outside its weight of {size} entries; "
                             "was it trained on another base model?")


def pafi_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Return ``{name: sorted flat indices}`` of the smallest-magnitude ``1 - sparsity`` fraction of the
    entries, ranked over all ``weights`` together (``global``) or within each one (``per_matrix``)."""
    if scope == "per_matrix":
        out = {}
        for name, w in weights.items():
            k = max(1, round((1 - sparsity) * w.numel()))
            out[name] = w.detach().abs().flatten().topk(k, largest=False).indices.sort().values
        return out
    flat = torch.cat([w.detach().abs().flatten().float() for w in weights.values()])
    k = max(1, round((1 - sparsity) * flat.numel()))
    chosen = flat.topk(k, largest=False).indices.sort().values
    out, start = {}, 0
    for name, w in weights.items():
        sel = chosen[(chosen >= start) & (chosen < start + w.numel())] - start
        out[name] = sel
        start += w.numel()
    return out


@register_method
class PafiMethod(OwnedTensorsMethod):
    """PaFi: train only the smallest-magnitude pre-trained weights (see the module docstring)."""

    peft_type = "PAFI"
    name = "pafi"
    config_class = PafiConfig
    mergeable = True
    config: PafiConfig

    def attach(self, model: nn.Module) -> nn.Module:
        """Freeze the model, choose the data-free mask, and wrap the target layers; returns the model."""
        refuse_quantized(model, self.name, "it trains a sparse subset of the base weights themselves, chosen "
                         "by magnitude, and those weights are stored as 4/8-bit codes")
        names = find_targets(model, self.config.targets)
        masks = pafi_masks({n: model.get_submodule(n).weight for n in names}, self.config.sparsity,
                           self.config.scope)
        _wrap(model, names, lambda n, m: SparseLinear(m, masks[n]), SparseLinear)
        return model

    def owned_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, layer in _layers(model, SparseLinear):
            out[f"{PEFT_PREFIX}{name}.pafi_indices"] = layer.indices
            out[f"{PEFT_PREFIX}{name}.pafi_values"] = layer.values
        out.update(head_parameters(model))
        return out


    @torch.no_grad()
    def load_delta_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy the saved values; the saved mask must be the one this base model gives (it is data-free)."""
        for name, layer in _layers(model, SparseLinear):
            saved = tensors.get(f"{PEFT_PREFIX}{name}.pafi_indices")
            if saved is not None and not torch.equal(saved.to(layer.indices), layer.indices):
                raise DeltatuneError(f"the pafi delta's mask for {name} differs from this base model's; "
                                     "was it trained on another base model or with another sparsity?")
        copy_checked(self.owned_tensors(model), tensors, self.name)

    def merge(self, model: nn.Module) -> nn.Module:
        """Add the trained values into the weights and put the plain nn.Linear back; returns the model."""
        return _merge(model, SparseLinear)
