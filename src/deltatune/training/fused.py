"""Fused RMSNorm and SwiGLU for Llama-family models: the same math, fewer activations kept for backward.

transformers' ``LlamaRMSNorm`` and ``LlamaMLP`` are chains of elementwise ops, and autograd keeps what each op
of a chain needs for the backward pass. In one forward of a 1000-token row (SmolLM2-135M, LoRA r16 on every
linear layer, float32), counting each tensor kept for backward once by its storage (parameters excluded):

- 1536-wide tensors (the MLP's inner size) 737 MB, 4 per layer: the gate projection's output (kept by the
  SiLU), the SiLU's output and the up projection's output (kept by their product), and the product itself
  (kept by ``down_proj``'s LoRA branch);
- 576-wide tensors (the hidden size) 276 MB: per RMSNorm its input (kept by ``pow`` and ``x * rstd``) and
  its output (kept by the next layer's LoRA branch), and attention's output; in bfloat16 a norm keeps its
  input's float32 copy (twice the input's bytes) and, where the weight trains, the normalized rows too;
- attention's q/k/v/out (185 MB) and the logits (98 MB), which this module leaves alone.

(Counting every save separately, as a plain ``saved_tensors_hooks`` census does, gives 1.86 GB: the norm's
input is kept twice, by ``pow`` and by the product.) As Unsloth and Liger do, two ``torch.autograd.Function``
s replace those chains:

- :class:`RMSNormFunction` computes ``weight * (x * rsqrt(mean(x^2) + eps))`` in float32, cast back to the
  input's dtype exactly as ``LlamaRMSNorm`` does (the same ops: the same output, bit for bit), and keeps one
  float per row (``rstd``) and one row-sized tensor: where the output ``y`` has the input's dtype (float32 or
  bfloat16), ``y`` itself, which the next layer keeps anyway, the normalized rows being ``y / weight`` (only for
  a weight without zeros), else ``x``; its backward computes ``grad_x`` in closed form, and ``grad_weight`` only
  when the weight trains (full fine-tuning, bitfit, freeze of norms).
- :class:`SiluMulFunction` computes ``silu(gate) * up`` and keeps only ``gate`` and ``up``; its backward
  recomputes the SiLU and uses the same kernels as autograd (the same gradients, bit for bit).

On that row the tensors kept for backward go from 1.31 GB to 0.99 GB (-24%; 1536-wide 737 -> 553 MB, 576-wide
276 -> 141 MB), with the same loss and gradients to 7e-6 (relative). Written with in-place ops on their own
temporaries, the norm's forward and backward take about half the eager chain's time and the SwiGLU's about
the same (1000 x 576 and 1000 x 1536, one CPU thread); the whole step, dominated by matrix products, takes
the same time (13.2 s on one thread, both). The product ``silu(gate) * up`` stays: ``down_proj`` (its LoRA
branch) keeps it, and recovering it would mean fusing into that layer.

:func:`use_fused_modules` patches a model's modules in place (instance ``forward`` only: classes,
``isinstance``, parameter names and state_dict keys are unchanged, so saving, merging and every method keep
working), and only where it can show the module computes exactly this: a class named ``*RMSNorm`` with the
standard attributes whose output on a probe input equals the fused one (a Gemma-style ``(1 + weight)`` norm
is left alone), and an MLP whose forward uses exactly ``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``
(a SiLU without hooks) and, probed with stand-in projections, computes ``down(silu(gate(x)) * up(x))``.
The projections themselves are called as before, so LoRA / DoRA / IA3 (which scales ``down_proj``'s input
in its own wrapper) / adapter / quantized wrappers of them behave unchanged.

    if data.task == "causal_lm" and use_fused_modules(model):
        say("fused RMSNorm/SwiGLU: ...")
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_FUSED = "_deltatune_fused"
"""Attribute set on a patched module (the kind of patch), so patching twice is a no-op."""

_MLP_NAMES = frozenset({"gate_proj", "up_proj", "down_proj", "act_fn"})


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype)`` with the statistics in float32, as
    transformers' ``LlamaRMSNorm``. Keeps ``rstd`` (one float per row), ``weight``, and either ``x`` or, with
    ``save_output``, the output ``y`` itself, from which backward recovers the normalized rows as ``y / weight``:
    the layer after the norm (a LoRA branch, a trained linear layer) keeps ``y`` anyway, so the norm then adds
    no row-sized tensor of its own. Only pass ``save_output`` for a float32 or bfloat16 ``y`` of ``x``'s dtype and
    a weight without zeros (see :func:`_can_share_output`). In bfloat16 the rows recovered that way carry one more
    bfloat16 rounding (2^-8 relative at most, the precision the forward pass ran in): that is what the next layer
    saves, so the norm keeps no copy of the residual stream, as in float32."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, save_output: bool = False
                ) -> torch.Tensor:
        """Return the normalized, scaled ``x`` (dtype: ``weight``'s and ``x``'s promoted)."""
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
        n = (xf * rstd).to(x.dtype)  # a new tensor: scaled in place below where the dtypes allow
        y = n.mul_(weight) if weight.dtype == n.dtype else weight * n
        ctx.save_output = save_output = save_output and y.dtype == x.dtype in _SHARED_DTYPES
        ctx.save_for_backward(y if save_output else x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        """Return (grad of x, grad of weight or None where it does not train, None, None)."""
        saved, rstd, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        x_dtype = saved.dtype  # x's, or y's where that is x's
        if ctx.save_output:  # n = y / weight, to y's rounding
            n_f = _cast(saved, torch.float32) / _cast(weight, torch.float32)
        else:
            n_f = saved.to(torch.float32) * rstd  # the normalized rows, float32 (a new tensor)
        grad_x = grad_w = None
        if need_w:  # y = weight * n: grad_weight sums grad_y * n over every row (n in x's dtype, as forward had it)
            grad_w = _cast((grad_y * _cast(n_f, x_dtype)).sum_to_size(weight.shape), weight.dtype)
        if need_x:
            g = _cast(grad_y * weight, x_dtype).to(torch.float32)  # grad of n, through n's cast to x.dtype
            # n = x * r, r = (mean(x^2) + eps)^-1/2  =>  dx = r * (g - n * mean(g * n)); in place on g and n_f,
            # both new tensors of this backward
            dot = (g * n_f).mean(-1, keepdim=True)
            grad_x = _cast(g.sub_(n_f.mul_(dot)).mul_(rstd), x_dtype)
        return grad_x, grad_w, None, None


class SiluMulFunction(torch.autograd.Function):
    """``silu(gate) * up``, keeping only ``gate`` and ``up`` for backward (the SiLU is recomputed there)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Return ``silu(gate) * up``."""
        ctx.save_for_backward(gate, up)
        s = F.silu(gate)
        return s.mul_(up) if s.shape == up.shape and s.dtype == up.dtype else s * up

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Return (grad of gate, grad of up), each in its input's dtype."""
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_s = _cast(grad_out * up, gate.dtype)  # grad of silu(gate), as autograd would cast it
            grad_gate = torch.ops.aten.silu_backward(grad_s, gate)
        if ctx.needs_input_grad[1]:
            s = F.silu(gate)
            same = s.shape == grad_out.shape and s.dtype == grad_out.dtype
            grad_up = _cast(s.mul_(grad_out) if same else grad_out * s, up.dtype)
        return grad_gate, grad_up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Return the fused RMSNorm of ``x`` (see :class:`RMSNormFunction`), keeping ``x`` for backward."""
    return RMSNormFunction.apply(x, weight, eps, False)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Return ``silu(gate) * up`` through :class:`SiluMulFunction`."""
    return SiluMulFunction.apply(gate, up)


_TINY = 1e-12
"""A weight entry at least this large (in magnitude) divides out of ``y = weight * n`` to ``y``'s rounding."""
_SHARED_DTYPES = (torch.float32, torch.bfloat16)
"""Dtypes whose norm output stands in for its input (bfloat16 has float32's exponent range: ``y`` cannot
underflow where float32's would not; float16's can)."""


def _can_share_output(module: nn.Module) -> bool:
    """True when the norm's output can stand in for its input in backward: a float32 or bfloat16 weight whose
    entries are all finite and at least ``_TINY`` in magnitude. Checked once per version of the weight (an optimizer
    step or any in-place change makes a new version), so a GPU synchronizes once per step, not per call."""
    weight = module.weight
    version = (weight._version, weight.data_ptr())
    cached = module.__dict__.get("_deltatune_share")
    if cached is None or cached[0] != version:
        w = weight.detach()  # no autograd record (a checkpointed region must save the same tensors on recompute)
        ok = w.dtype in _SHARED_DTYPES and bool((torch.isfinite(w) & (w.abs() >= _TINY)).all())
        cached = (version, ok)
        module.__dict__["_deltatune_share"] = cached
    return cached[1]


def _fused_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    share = (hidden_states.dtype == self.weight.dtype and torch.is_grad_enabled()  # y in x's dtype: see forward
             and _can_share_output(self))
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, share)


def _fused_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate = self.gate_proj(x)  # the same calls in the same order as LlamaMLP.forward (an adapter tap may
    up = self.up_proj(x)      # read up_proj's input); only the SiLU and product are fused
    return self.down_proj(SiluMulFunction.apply(gate, up))


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _is_silu(act: Any) -> bool:
    """True for a SiLU module (``nn.SiLU`` or transformers' ``SiLUActivation``) that nothing hooks."""
    if not isinstance(act, nn.Module) or _has_hooks(act) or list(act.parameters(recurse=True)):
        return False
    if type(act) is nn.SiLU:
        return not act.inplace
    return type(act).__name__ == "SiLUActivation" and type(act).__module__.startswith("transformers.")


def _probe(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)  # a local generator: patching leaves the global RNG untouched
    return (torch.randn(shape, generator=gen) * 3).to(device=device, dtype=dtype)


def _norm_matches(module: nn.Module) -> bool:
    """True when ``module`` looks like a Llama-family RMSNorm and its own forward equals the fused one on a
    probe input (to 1e-6)."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, nn.Parameter):
        return False
    if weight.dim() != 1 or not weight.dtype.is_floating_point or weight.device.type == "meta":
        return False
    if not isinstance(eps, float) or [n for n, _ in module.named_parameters()] != ["weight"]:
        return False
    if list(module.buffers()) or list(module.children()):
        return False
    x = _probe((3, weight.shape[0]), weight.device, weight.dtype)
    try:
        with torch.no_grad():
            want = type(module).forward(module, x)
            got = RMSNormFunction.apply(x, weight, eps, False)
    except Exception:  # any failure means: leave the module as it is
        return False
    return (isinstance(want, torch.Tensor) and want.shape == got.shape and want.dtype == got.dtype
            and torch.allclose(want.float(), got.float(), rtol=1e-6, atol=1e-6))


class _StandIn(nn.Module):
    """An elementwise stand-in for a projection, ``a * x + b``, used to probe an MLP's forward."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * x + self.b


def _mlp_matches(module: nn.Module) -> bool:
    """True when ``module``'s forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with a SiLU act_fn:
    its code names exactly those four attributes, and run with elementwise stand-ins for the projections
    (swapped in and back without calling the real ones) it computes that."""
    if not all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")):
        return False
    if not _is_silu(getattr(module, "act_fn", None)):
        return False
    forward = getattr(type(module), "forward", None)
    code = getattr(forward, "__code__", None)
    if code is None or code.co_argcount != 2 or set(code.co_names) != _MLP_NAMES:
        return False
    x = _probe((2, 8), torch.device("cpu"), torch.float32)
    saved = {n: module._modules[n] for n in ("gate_proj", "up_proj", "down_proj")}
    try:  # the real projections are not called: no LoRA dropout, adapter tap or quantized kernel runs
        module._modules.update(gate_proj=_StandIn(2.0, 0.5), up_proj=_StandIn(-1.5, 0.25),
                               down_proj=_StandIn(1.0, 0.0))
        with torch.no_grad():
            got = forward(module, x)
    except Exception:  # any failure means: leave the module as it is
        return False
    finally:
        module._modules.update(saved)
    want = F.silu(2.0 * x + 0.5) * (-1.5 * x + 0.25)
    return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got, want, atol=1e-6)


def use_fused_modules(model: nn.Module) -> bool:
    """Give every Llama-family RMSNorm and SwiGLU MLP of ``model`` the fused forward (in place, per instance;
    see the module docstring for what is checked first). Returns True if any module was patched."""
    patched = False
    for module in model.modules():
        if getattr(module, _FUSED, None) or "forward" in module.__dict__:  # ours already, or patched by another
            continue
        if _norm_matches(module):
            module.forward = functools.partial(_fused_norm_forward, module)  # deep-copies and pickles
            setattr(module, _FUSED, "rms_norm")
            patched = True
        elif _mlp_matches(module):
            module.forward = functools.partial(_fused_mlp_forward, module)
            setattr(module, _FUSED, "swiglu")
            patched = True
    return patched


def fused_modules(model: nn.Module) -> dict[str, str]:
    """Return ``{module name: "rms_norm" | "swiglu"}`` for every module of ``model`` that is patched."""
    return {n: getattr(m, _FUSED) for n, m in model.named_modules() if getattr(m, _FUSED, None)}


def remove_fused_modules(model: nn.Module) -> int:
    """Give every patched module of ``model`` its class's forward back; returns how many were restored."""
    count = 0
    for module in model.modules():
        if getattr(module, _FUSED, None):
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_deltatune_share", None)
            delattr(module, _FUSED)
            count += 1
    return count
