"""The output layer and the cross-entropy in one pass over chunks of rows, never holding all the logits.

At a supervised position the output layer of SmolLM2 produces 49,152 float32 logits (192 KB); a 1,000-token
pass with 77% supervised positions holds about 150 MB of logits, plus as much again for the log-softmax
autograd keeps and for the gradient of the logits in the backward pass. ``linear_cross_entropy_sum``
computes, chunk by chunk of rows, the logits ``h @ W^T``, the summed cross-entropy and, in the same pass,
its gradient with respect to ``h`` (and ``W`` when the output layer trains); the backward pass only scales
the stored gradients. The matmuls are the ones autograd would run, so the time is the same and the peak
holds one chunk of logits. (The idea of Liger-Kernel's and Cut Cross-Entropy's fused linear cross-entropy.)

    hidden = model(**inputs, logits_to_keep=keep) with the output layer swapped for an identity (see
    ``hidden_states_at``), then loss = linear_cross_entropy_sum(hidden, head.weight, targets)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from deltatune.compute.precision import shape_step
from deltatune.data.tokenize import IGNORE_INDEX as IGNORE

CHUNK_ROWS = 128
SOFTMAX_ROWS = 32
"""In bf16, rows per float32 log-softmax (the logits of a whole chunk are bf16; see ``_LinearCrossEntropy``)."""
_PLAIN_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen3"}
"""Model types whose causal LM computes ``logits = lm_head(hidden)`` with no scaling or soft-capping."""


def _padded_rows(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 filler: int) -> tuple[torch.Tensor, torch.Tensor]:
    """On a CPU in bf16/fp16 (either input, or under autocast), pad ``hidden`` with zero rows and ``targets`` with
    ``filler`` up to a multiple of 64 rows; return both (unchanged in float32). The last chunk of each pass would
    otherwise bring a new row count, hundreds over a run (see ``precision.SHAPE_STEP``)."""
    pad = -hidden.shape[0] % shape_step(hidden.device, hidden.dtype, weight.dtype)
    if not pad:
        return hidden, targets
    return (torch.nn.functional.pad(hidden, (0, 0, 0, pad)),
            torch.nn.functional.pad(targets, (0, pad), value=filler))


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``hidden @ weight.t()`` runs in here: autocast's when it is on, else the inputs' promotion."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Each chunk of rows: the logits into one reused buffer, then, a few rows at a time, their float32
    log-softmax (the loss gathers from it) and the softmax minus the one-hot in place of it, written back over the
    spent logits, then the gradient rows ``(softmax - onehot) @ W``. In float32 all of it happens in the logits
    buffer itself; in bf16 the float32 rows take their own buffer of ``SOFTMAX_ROWS`` rows (6 MB for SmolLM2's
    vocabulary, where a chunk's would be 25 MB, twice the bf16 logits). The buffers live for the whole call: a
    fresh 25 MB tensor per chunk costs its page faults every time."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, want_h: bool,
                want_w: bool) -> torch.Tensor:
        dtype = _matmul_dtype(hidden, weight)
        device = hidden.device
        total = torch.zeros((), dtype=torch.float32, device=device)
        grad_h = torch.empty(hidden.shape, dtype=dtype, device=device) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        rows = min(CHUNK_ROWS, hidden.shape[0])
        vocab = weight.shape[0]
        in_place = dtype == torch.float32
        step = CHUNK_ROWS if in_place else SOFTMAX_ROWS
        with torch.autocast(device.type, enabled=False):
            w = weight.to(dtype)
            logits = torch.empty(rows, vocab, dtype=dtype, device=device)  # then the gradient of the logits
            spare = None if in_place else torch.empty(min(step, rows), vocab, dtype=torch.float32, device=device)
            for start in range(0, hidden.shape[0], CHUNK_ROWS):
                h = hidden[start:start + CHUNK_ROWS].to(dtype)
                t = targets[start:start + CHUNK_ROWS]
                n = len(t)
                torch.mm(h, w.t(), out=logits[:n])
                valid = t != IGNORE
                picked = t.clamp(min=0)
                for a in range(0, n, step):
                    b = min(a + step, n)
                    logp = logits[a:b] if spare is None else spare[:b - a]
                    torch.log_softmax(logits[a:b], dim=-1, dtype=torch.float32, out=logp)
                    total -= (logp.gather(1, picked[a:b, None]).squeeze(1) * valid[a:b]).sum()
                    if not (want_h or want_w):
                        continue
                    soft = logp.exp_()  # softmax, in place
                    soft[torch.arange(b - a, device=device), picked[a:b]] -= 1.0
                    if not bool(valid[a:b].all()):
                        soft.mul_(valid[a:b, None])
                    if spare is not None:
                        logits[a:b].copy_(soft)
                if grad_h is not None:
                    torch.mm(logits[:n], w, out=grad_h[start:start + n])
                if grad_w is not None:
                    grad_w += (logits[:n].t() @ h).float()
        if grad_h is not None:
            grad_h = grad_h.to(hidden.dtype)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.has = (want_h, want_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        saved = list(ctx.saved_tensors)
        want_h, want_w = ctx.has
        grad_h = saved.pop(0) * grad_out if want_h else None
        grad_w = (saved.pop(0) * grad_out).to(ctx.weight_dtype) if want_w else None
        return grad_h, grad_w, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return the summed cross-entropy of ``hidden @ weight^T`` (rows (N, d), weight (V, d)) against
    ``targets`` (N,), ignoring ``-100``; differentiable in ``hidden`` and ``weight`` with the gradients
    computed in the forward pass chunk by chunk (see the module docstring)."""
    want_h = torch.is_grad_enabled() and hidden.requires_grad
    want_w = torch.is_grad_enabled() and weight.requires_grad
    hidden, targets = _padded_rows(hidden, weight, targets, IGNORE)
    loss: torch.Tensor = _LinearCrossEntropy.apply(hidden, weight, targets, want_h, want_w)
    return loss


class _LinearTokenLogps(torch.autograd.Function):
    """Per-row log-probabilities of the targets; d logp / d h is kept from the forward pass ((N, d), the size of
    the hidden states), the output layer's gradient (when it trains) recomputes each chunk's softmax."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, want_h: bool,
                want_w: bool) -> torch.Tensor:
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        dlogp_dh = torch.empty_like(hidden) if want_h else None
        for start in range(0, hidden.shape[0], CHUNK_ROWS):
            h, t = hidden[start:start + CHUNK_ROWS], targets[start:start + CHUNK_ROWS]
            logp = torch.log_softmax(h @ weight.t(), dim=-1, dtype=torch.float32)  # (c, V)
            out[start:start + CHUNK_ROWS] = logp.gather(1, t[:, None]).squeeze(1)
            if dlogp_dh is not None:  # d logp / d logits = onehot - softmax
                grad = logp.exp_().neg_()
                grad[torch.arange(len(t), device=grad.device), t] += 1.0
                dlogp_dh[start:start + CHUNK_ROWS] = grad.to(weight.dtype) @ weight
        ctx.save_for_backward(dlogp_dh if want_h else None, hidden if want_w else None, weight if want_w else None,
                              targets)
        ctx.has = (want_h, want_w)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        dlogp_dh, hidden, weight, targets = ctx.saved_tensors
        want_h, want_w = ctx.has
        grad_h = dlogp_dh * grad_out[:, None].to(dlogp_dh.dtype) if want_h else None
        grad_w = None
        if want_w:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for start in range(0, hidden.shape[0], CHUNK_ROWS):
                h, t = hidden[start:start + CHUNK_ROWS], targets[start:start + CHUNK_ROWS]
                logits = (h @ weight.t()).float()
                grad = torch.softmax(logits, dim=-1).neg_()
                grad[torch.arange(len(t), device=grad.device), t] += 1.0
                grad.mul_(grad_out[start:start + CHUNK_ROWS, None])
                grad_w += grad.t() @ h.float()
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return the log-probability of each target under ``log_softmax(hidden @ weight^T)`` (rows (N, d), weight
    (V, d), targets (N,) valid ids) as a float32 (N,) tensor, chunk by chunk of rows so the (N, V) logits never
    exist at once; differentiable in ``hidden`` and ``weight``."""
    want_h = torch.is_grad_enabled() and hidden.requires_grad
    want_w = torch.is_grad_enabled() and weight.requires_grad
    rows = hidden.shape[0]
    hidden, targets = _padded_rows(hidden, weight, targets, 0)
    logps: torch.Tensor = _LinearTokenLogps.apply(hidden, weight, targets, want_h, want_w)
    return logps[:rows]


def plain_output_layer(model: nn.Module) -> nn.Linear | None:
    """Return the model's output layer when the logits are exactly ``lm_head(hidden)`` (a bias-free
    ``nn.Linear`` of a known model family), else None (the loss then takes the model's logits)."""
    config = getattr(model, "config", None)
    head = getattr(model, "lm_head", None)
    if getattr(config, "model_type", None) not in _PLAIN_HEAD_MODELS or type(head) is not nn.Linear:
        return None
    if head.bias is not None or getattr(config, "final_logit_softcapping", None):
        return None
    return head


@contextmanager
def hidden_states_at(model: nn.Module) -> Iterator[None]:
    """Within the block the model's ``logits`` are its final hidden states (the output layer is an
    identity), so the loss can apply the output layer itself."""
    head = model.lm_head
    model.lm_head = nn.Identity()
    try:
        yield
    finally:
        model.lm_head = head
