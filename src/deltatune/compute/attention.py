"""Attention for packed rows that computes each example's own causal attention and nothing else.

A packed row of T tokens holding examples of lengths L1..Lk needs only sum(Li^2)/2 attention scores, but
a (T, T) block-diagonal mask makes the attention kernel compute all T^2 of them and keeps a T x T mask
per step; with 8 alpaca examples per row that is ~8x the useful attention work, and a float mask also
rules out the fused (flash) CPU kernel. ``deltatune_varlen`` is an attention function registered with
transformers: when the forward receives ``cu_seq_lens_q`` (the row's example boundaries, the same
keyword flash-attention's variable-length path takes), it runs ``scaled_dot_product_attention`` with
``is_causal=True`` on each example's slice, which takes the fused kernel and no mask. Without that keyword
(padded batches, eval, generation) it is transformers' own sdpa attention with the usual masks, so a
model switched to it behaves exactly as before everywhere else.

Measured by bench/techniques.py (SmolLM2-135M + LoRA r16, 8 alpaca examples per step, 2 CPU threads): on one
~1,600-token packed row per step, 1.42x the tokens/s of the same row under a 4D block mask, the same loss;
with the default rows of at most 640 tokens (train.pass_tokens), 1.07x.

    if enable_packed_attention(model):                    # sdpa models of the AttentionInterface family
        batch = collate(examples, mode="pack", block_mask=False, ...)   # cu_seq_lens instead of a mask
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.compute.precision import shape_step

NAME = "deltatune_varlen"
PAIRS = "deltatune_pairs"  # forward keyword: the layout of packed preference pairs (see _pair_attention)
_registered = False


def _varlen_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention over (B, H, T, D) tensors; returns ((B, T, H, D) output, None) as transformers expects."""
    bounds = kwargs.get("cu_seq_lens_q")
    pairs = kwargs.get(PAIRS)
    if pairs is not None and query.shape[2] == key.shape[2]:
        return _pair_attention(query, key, value, pairs, dropout, scaling), None
    if bounds is None or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise ValueError("packed attention expects one packed row per micro-batch")
    cuts = bounds.tolist()
    parts = [causal_sdpa(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout, scaling)
             for s, e in itertools.pairwise(cuts) if e > s]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


MATH_MAX_LENGTH = 2048  # bf16 on CPU: sequences up to this take deltatune's attention (beyond: flash attention)
ONE_BLOCK_MAX = 256  # up to this, _CausalAttentionBF16; longer: _BlockedCausalAttentionBF16 in blocks of BLOCK
BLOCK = 128


def causal_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float = 0.0,
                scale: float | None = None) -> torch.Tensor:
    """Causal attention over (B, H, T, D) tensors (grouped key/value heads allowed); returns (B, H, T, D).

    bfloat16 on a CPU, no dropout, T <= 2,048: :class:`_CausalAttentionBF16` (T <= 256) or
    :class:`_BlockedCausalAttentionBF16` (batched bf16 matmuls, recompute in backward). Otherwise
    ``scaled_dot_product_attention`` (flash attention). In bfloat16 or float16 on a CPU the
    sequences are padded at the end to a multiple of 64 first (causal attention never lets a real query see the
    padding, and the padded rows are cut off): see ``precision.SHAPE_STEP``."""
    length = query.shape[2]
    pad = -length % shape_step(query.device, query.dtype)
    if pad:
        query, key, value = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
    if (query.dtype == torch.bfloat16 and query.device.type == "cpu" and not dropout
            and length <= MATH_MAX_LENGTH and query.shape[1] % key.shape[1] == 0):
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        kernel = _CausalAttentionBF16 if query.shape[2] <= ONE_BLOCK_MAX else _BlockedCausalAttentionBF16
        out: torch.Tensor = kernel.apply(query, key, value, scale)
    else:
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scale,
                                             enable_gqa=query.shape[1] != key.shape[1])
    return out[:, :, :length] if pad else out


def _stack_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, position_major: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Stack each key head's query heads into one matrix: returns ((B*KV, group*T, D) queries, (B*KV, T, D) keys and
    values, group). Rows are head-major (r*T + p) or, with ``position_major``, position-major (p*group + r)."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    if position_major:
        grouped_q = query.reshape(batch, kv_heads, group, length, dim).transpose(2, 3).reshape(
            batch * kv_heads, length * group, dim)
    else:
        grouped_q = query.reshape(batch * kv_heads, group * length, dim)
    flat = (batch * kv_heads, length, dim)
    return grouped_q, key.reshape(flat), value.reshape(flat), group


def _causal_probs(grouped_q: torch.Tensor, key: torch.Tensor, group: int, scale: float) -> torch.Tensor:
    """Softmax of the causal scores of (N, group*T, D) queries (each key head's query heads one after the other)
    against (N, T, D) keys; returns (N, group*T, T) in the inputs' dtype (the softmax accumulates in float32)."""
    mask = _causal_mask(key.shape[1], group, key.dtype, key.device)
    scores = torch.baddbmm(mask, grouped_q, key.transpose(1, 2), alpha=scale)
    return torch.softmax(scores, dim=-1)


@functools.lru_cache(maxsize=16)
def _causal_mask(length: int, group: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive causal mask (-inf above the diagonal) of ``length`` tokens, stacked ``group`` times: (group*T, T).
    Cached: in bf16 the lengths are multiples of 64, so a run meets at most 4 of them up to 256."""
    mask = torch.full((length, length), float("-inf"), dtype=dtype, device=device).triu_(1)
    return mask.repeat(group, 1)


class _CausalAttentionBF16(torch.autograd.Function):
    """Causal attention in bf16 on a CPU for sequences of up to 256 tokens: 1.3-2.4x torch's flash attention there
    (bench/bf16_attention.py).

    torch's CPU flash-attention kernel works on small blocks and gains nothing from the bf16 dot-product units;
    short sequences (SFT examples are mostly a few hundred tokens) are served better by three batched bf16 matmuls
    per direction (they cut a SmolLM2 bf16 LoRA step from 3.7 to 2.7-3.0 s, bench/speed.py): scores = Q K^T (bf16,
    the causal mask added by the same ``baddbmm``), P = softmax(scores) (accumulated in float32, stored as bf16),
    O = P V. Grouped-query heads never copy the keys: each key head's query heads are stacked into one
    (group*T, D) matrix. Backward recomputes P instead of storing it (nothing of size T^2 outlives a layer, as
    with flash attention) and runs dV = P^T dO, dS = softmax_backward(dO V^T, P), dQ = dS K, dK = dS^T Q. The
    scores are rounded to bf16 before the softmax (as transformers' eager attention does under autocast): outputs
    and gradients stay within about 1% of float64's, against flash's 0.5-0.9%."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        batch, heads, length, dim = query.shape
        with torch.autocast("cpu", enabled=False):
            grouped_q, keys, values, group = _stack_heads(query, key, value, position_major=False)
            out = torch.bmm(_causal_probs(grouped_q, keys, group, scale), values)
        ctx.save_for_backward(grouped_q, keys, values)
        ctx.scale, ctx.group, ctx.shapes = scale, group, (query.shape, key.shape)
        return out.view(batch, heads, length, dim)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        grouped_q, keys, values = ctx.saved_tensors
        query_shape, key_shape = ctx.shapes
        with torch.autocast("cpu", enabled=False):
            probs = _causal_probs(grouped_q, keys, ctx.group, ctx.scale)
            grad_out = grad_out.to(values.dtype).reshape(grouped_q.shape)
            grad_v = torch.bmm(probs.transpose(1, 2), grad_out)
            grad_s = torch._softmax_backward_data(torch.bmm(grad_out, values.transpose(1, 2)), probs, -1, probs.dtype)
            del probs
            grad_q = torch.bmm(grad_s, keys).mul_(ctx.scale)
            grad_k = torch.bmm(grad_s.transpose(1, 2), grouped_q).mul_(ctx.scale)
        return grad_q.view(query_shape), grad_k.view(key_shape), grad_v.view(key_shape), None


@functools.lru_cache(maxsize=64)
def _block_mask(start: int, stop: int, group: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The additive causal mask of query positions [start, stop), each repeated ``group`` times (position-major
    rows), against keys [0, stop): (group*(stop-start), stop). Cached: block bounds are multiples of 64."""
    mask = torch.full((stop - start, stop), float("-inf"), dtype=dtype, device=device).triu_(start + 1)
    return mask.repeat_interleave(group, dim=0)


def _block_probs(grouped_q: torch.Tensor, keys: torch.Tensor, start: int, stop: int, group: int,
                 scale: float) -> torch.Tensor:
    """Softmax of the causal scores of the position-major query rows of positions [start, stop) against keys
    [0, stop); returns (N, group*(stop-start), stop) in bf16 (accumulated in float32)."""
    mask = _block_mask(start, stop, group, keys.dtype, keys.device)
    rows = grouped_q[:, start * group:stop * group]
    return torch.softmax(torch.baddbmm(mask, rows, keys[:, :stop].transpose(1, 2), alpha=scale), dim=-1)


class _BlockedCausalAttentionBF16(torch.autograd.Function):
    """:class:`_CausalAttentionBF16` for longer sequences, in blocks of 128 query positions: a block attends to the
    keys up to its own end only, so the scores above the diagonal's blocks are never computed (3/8 of the work at
    512 tokens) and each block's scores stay small enough for the cache. Measured against torch's flash attention
    (bench/bf16_attention.py): about 1.5x from 320 to 2,048 tokens. The query heads of a key head are stacked
    position-major (row p*group + r), so a block is one contiguous slice of rows; dK and dV gather the blocks'
    contributions in float32."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        batch, _, length, dim = query.shape
        kv_heads = key.shape[1]
        with torch.autocast("cpu", enabled=False):
            grouped_q, keys, values, group = _stack_heads(query, key, value, position_major=True)
            out = torch.empty_like(grouped_q)
            for start in range(0, length, BLOCK):
                stop = min(start + BLOCK, length)
                torch.bmm(_block_probs(grouped_q, keys, start, stop, group, scale), values[:, :stop],
                          out=out[:, start * group:stop * group])
        ctx.save_for_backward(grouped_q, keys, values)
        ctx.scale, ctx.group, ctx.shapes = scale, group, (query.shape, key.shape)
        return out.view(batch, kv_heads, length, group, dim).transpose(2, 3).reshape(query.shape)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        grouped_q, keys, values = ctx.saved_tensors
        query_shape, key_shape = ctx.shapes
        batch, _, length, dim = query_shape
        group, scale = ctx.group, ctx.scale
        with torch.autocast("cpu", enabled=False):
            grad_out = grad_out.to(values.dtype).reshape(batch, key_shape[1], group, length, dim).transpose(
                2, 3).reshape(grouped_q.shape)
            grad_q = torch.empty_like(grouped_q)
            grad_k = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device)
            grad_v = torch.zeros(values.shape, dtype=torch.float32, device=values.device)
            for start in range(0, length, BLOCK):
                stop = min(start + BLOCK, length)
                rows = slice(start * group, stop * group)
                probs = _block_probs(grouped_q, keys, start, stop, group, scale)
                grad_v[:, :stop] += torch.bmm(probs.transpose(1, 2), grad_out[:, rows])
                grad_s = torch._softmax_backward_data(torch.bmm(grad_out[:, rows], values[:, :stop].transpose(1, 2)),
                                                      probs, -1, probs.dtype)
                torch.bmm(grad_s, keys[:, :stop], out=grad_q[:, rows])
                grad_k[:, :stop] += torch.bmm(grad_s.transpose(1, 2), grouped_q[:, rows])
            grad_q.mul_(scale)
            grad_k.mul_(scale)
        grad_q = grad_q.view(batch, key_shape[1], length, group, dim).transpose(2, 3).reshape(query_shape)
        return grad_q, grad_k.to(keys.dtype).view(key_shape), grad_v.to(values.dtype).view(key_shape), None


def _pair_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: list[list[int]],
                    dropout: float, scaling: float | None) -> torch.Tensor:
    """Attention of packed preference pairs ((start, P, C, R) each, data/pairs.py): prompt + chosen is one causal
    block; the rejected reply's queries attend to the prompt's keys and, causally, to its own. Returns (B, T, H, D)."""
    if query.shape[0] != 1:
        raise ValueError("packed attention expects one packed row per micro-batch")
    gqa = query.shape[1] != key.shape[1]
    parts = []
    for start, p, c, r in layout:
        mid, end = start + p + c, start + p + c + r
        parts.append(causal_sdpa(query[:, :, start:mid], key[:, :, start:mid], value[:, :, start:mid], dropout,
                                 scaling))
        if r:
            keys = torch.cat([key[:, :, start:start + p], key[:, :, mid:end]], dim=2)
            values = torch.cat([value[:, :, start:start + p], value[:, :, mid:end]], dim=2)
            allowed = torch.ones(r, p + r, dtype=torch.bool, device=query.device)
            allowed[:, p:] = torch.ones(r, r, dtype=torch.bool, device=query.device).tril()
            parts.append(F.scaled_dot_product_attention(query[:, :, mid:end], keys, values, attn_mask=allowed,
                                                        dropout_p=dropout, scale=scaling, enable_gqa=gqa))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous()


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, _varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # padded batches get sdpa's usual masks
    _registered = True


def enable_packed_attention(model: nn.Module) -> bool:
    """Switch a causal LM that runs transformers' sdpa attention to ``deltatune_varlen``; return True when
    the model now takes packed rows as ``cu_seq_lens`` (no block mask), False when it keeps its attention
    (eager or custom attention, models outside transformers)."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    _register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, KeyError, ImportError):
        return False
    return getattr(model.config, "_attn_implementation", None) == NAME


def packed_attention_enabled(model: nn.Module) -> bool:
    """Return True if ``model`` runs ``deltatune_varlen`` attention (packed rows need no block mask)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME


def restore_sdpa(model: nn.Module) -> None:
    """Put transformers' sdpa attention back (before saving a model or handing it to another library)."""
    if packed_attention_enabled(model):
        model.set_attn_implementation("sdpa")


def varlen_kwargs(seq_lens: torch.Tensor) -> dict[str, Any]:
    """Return the forward keywords that describe a packed row of examples of lengths ``seq_lens``."""
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32, device=seq_lens.device)
    cu[1:] = seq_lens.cumsum(0)
    longest = int(seq_lens.max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
