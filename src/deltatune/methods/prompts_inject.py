"""How virtual tokens reach a transformers model while its callers pass only the real tokens.

attach() adds one ``VirtualTokens`` module to the model (``model.virtual_tokens``: the trainable source
of the N virtual tokens) and registers one forward pre-hook and one forward hook on the model. The
caller (train loop, eval, ``model.generate``) calls the model exactly as it calls the base model and
gets outputs for its own positions only. The hook takes one of two routes, chosen once per model:

``prefix`` (causal models; prefix tuning on any model). The virtual tokens' keys and values are put
into the attention cache before the real tokens run, so every real token attends to them:

    cache[l] = (K_l, V_l)          K_l, V_l: (B, H_kv, N, d), the same for every row of the batch

For prefix tuning K_l, V_l are the trained tensors. For prompt tuning and p-tuning on a causal model
the virtual tokens come first and attend only to each other, so their keys and values do not depend
on the input: they are computed once per forward by running the backbone on the N virtual embeddings
alone (positions 0..N-1). That is exactly what concatenating them before every example computes
(tested against peft), at the cost of N tokens per forward instead of N per example, and it makes a
packed row trivial: every example of the row attends to the same N cached columns.

``concat`` (prompt tuning and p-tuning on bidirectional encoders such as BERT, where the virtual
tokens also attend to the input): the N virtual embeddings are concatenated before the input
embeddings, as peft does; token-level logits of the virtual positions are dropped again.

In both routes the caller's tensors are adjusted (N virtual tokens, B rows, T real tokens):

    attention_mask (B, T)          -> ones (B, N) prepended
    attention_mask (B, 1, T, T)    -> N allowed key columns prepended: 0.0 additive / True boolean (prefix)
    position_ids (B, T)            -> + N: the real tokens sit after the virtual ones, as in peft
    token_type_ids (B, T)          -> zeros (B, N) prepended (concat)
    logits_to_keep, output logits  -> unchanged (prefix: the real tokens keep their indices)

During ``generate`` the pre-hook fills the (empty) cache that generate hands to the first forward; later
steps find the prefix already in the cache and only get their mask and positions shifted.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from torch import nn
from transformers import DynamicCache

from deltatune.errors import DeltatuneError
from deltatune.modules import mark_added

ATTR = "virtual_tokens"
Kind = Literal["tokens", "kv"]


def kv_layout(config: Any) -> tuple[int, int, int]:
    """Return (layers, key/value heads, head size) of a transformers config: the shape of a prefix."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return layers, kv_heads, head_dim


def is_causal(model: nn.Module) -> bool:
    """Return True if the model's self-attention is causal (its attention modules say ``is_causal``)."""
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


class VirtualTokens(nn.Module):
    """The source of N virtual tokens and how they enter the model.

    ``encoder()`` returns either N virtual token embeddings (N, D) (``kind="tokens"``) or N flat
    per-layer key/value prefixes (N, 2 * layers * H_kv * d) in peft's layout (``kind="kv"``). The route
    (module docstring) is ``prefix`` for key/value prefixes and for causal models, else ``concat``;
    ``enabled=False`` makes the model compute as the base model.
    """

    def __init__(self, encoder: nn.Module, num_tokens: int, kind: Kind, causal: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.num_tokens = num_tokens
        self.kind = kind
        self.causal = causal
        self.route: Literal["prefix", "concat"] = "prefix" if kind == "kv" or causal else "concat"
        self.enabled = True

    def layer_kv(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Return per layer (keys, values), each (1, H_kv, N, d) in the model's dtype."""
        dtype = model.get_input_embeddings().weight.dtype
        out = self.encoder()
        if self.kind == "kv":
            layers, heads, head_dim = kv_layout(model.config)
            # peft's layout: (N, 2L * H * d) -> (N, 2L, H, d) -> (2L, H, N, d); layer l is rows 2l (K), 2l+1 (V)
            kv = out.to(dtype).view(self.num_tokens, 2 * layers, heads, head_dim).permute(1, 2, 0, 3)
            return [(kv[2 * i][None], kv[2 * i + 1][None]) for i in range(layers)]
        cache = DynamicCache(config=model.config)
        model.base_model(inputs_embeds=out.to(dtype)[None], cache=cache, use_cache=True)  # positions 0..N-1
        return [(layer.keys, layer.values) for layer in cache.layers]

    def fill_cache(self, model: nn.Module, batch: int, cache: Any | None) -> Any:
        """Return ``cache`` (a new DynamicCache if None) holding the prefix for ``batch`` rows."""
        cache = cache if cache is not None else DynamicCache(config=model.config)
        for i, (k, v) in enumerate(self.layer_kv(model)):
            cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), i)
        return cache


def install(model: nn.Module, virtual: VirtualTokens) -> None:
    """Add ``virtual`` to ``model`` as ``model.virtual_tokens`` and hook the model's forward."""
    if hasattr(model, ATTR):
        raise DeltatuneError("this model already has virtual tokens (a prompt method); load a fresh base model")
    model.add_module(ATTR, virtual)
    mark_added(virtual)
    model.register_forward_pre_hook(_before_forward, with_kwargs=True)
    model.register_forward_hook(_after_forward, with_kwargs=True)


def virtual_tokens(model: nn.Module) -> VirtualTokens:
    """Return the model's VirtualTokens; raise DeltatuneError if no prompt method is attached."""
    found = getattr(model, ATTR, None)
    if not isinstance(found, VirtualTokens):
        raise DeltatuneError("no prompt method is attached to this model; attach the method first")
    return found


def _as_kwargs(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Name positional arguments (``model(ids)``) so the hook sees every input by name."""
    kw = dict(kwargs)
    if args:
        bound = inspect.signature(model.forward).bind_partial(*args)
        kw.update(bound.arguments)
    if "past_key_values" in kw:  # the name before transformers 5.x renamed it to `cache`
        kw["cache"] = kw.pop("past_key_values")
    return kw


def _prepend(t: torch.Tensor, n: int, value: float | bool) -> torch.Tensor:
    """Return ``t`` with ``n`` columns of ``value`` prepended along the last dimension."""
    return torch.cat([t.new_full((*t.shape[:-1], n), value), t], dim=-1)


def _before_forward(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    vt = getattr(model, ATTR)
    if not vt.enabled:
        return None
    kw = _as_kwargs(model, args, kwargs)
    n = vt.num_tokens
    ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
    batch = (ids if ids is not None else embeds).shape[0]
    mask, pos = kw.get("attention_mask"), kw.get("position_ids")
    if vt.route == "prefix":
        # use_cache=False (e.g. generate without a cache) re-runs the whole sequence: never reuse a cache then
        cache = kw.get("cache") if kw.get("use_cache") is not False else None
        if cache is None or cache.get_seq_length() == 0:  # else a later generate step: the prefix is cached
            kw["cache"] = vt.fill_cache(model, batch, cache)
        if mask is not None:
            allowed = 0.0 if mask.dim() == 4 and mask.is_floating_point() else 1
            mask = _prepend(mask, n, allowed)
            if mask.dim() == 2 and not vt.causal:  # encoders size a 2D mask by the queries only
                keep = mask.bool()[:, None, None, :]  # (B, 1, 1, N + T)
                mask = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device).masked_fill_(
                    ~keep, torch.finfo(torch.float32).min)
            kw["attention_mask"] = mask
        if pos is not None:
            kw["position_ids"] = pos + n
        return (), kw
    # concat: virtual embeddings before the input embeddings
    if mask is not None and mask.dim() != 2:
        raise DeltatuneError("prompt tuning on a bidirectional encoder needs a 2D (B, T) attention mask; "
                             "use data.batching: pad or bucket")
    if embeds is None:
        embeds = model.get_input_embeddings()(ids)
    prompts = vt.encoder().to(embeds.dtype)[None].expand(batch, -1, -1)  # (B, N, D)
    kw["input_ids"] = None
    kw["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)  # (B, N + T, D)
    if mask is not None:
        kw["attention_mask"] = _prepend(mask, n, 1)
    if kw.get("token_type_ids") is not None:
        kw["token_type_ids"] = _prepend(kw["token_type_ids"], n, 0)
    if pos is not None:
        kw["position_ids"] = torch.cat([torch.arange(n, device=pos.device).expand(pos.shape[0], n), pos + n], 1)
    return (), kw


def _after_forward(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    vt = getattr(model, ATTR)
    logits = getattr(output, "logits", None)
    if vt.enabled and vt.route == "concat" and logits is not None and logits.dim() == 3:
        output.logits = logits[:, vt.num_tokens:]  # token-level heads: the caller's positions only
    return output
