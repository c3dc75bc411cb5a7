"""Evaluation: loss and perplexity, accuracy for classifiers, exact match on generated replies."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from deltatune.compute.attention import packed_attention_enabled
from deltatune.compute.loss import causal_lm_loss_sum, classification_loss_sum
from deltatune.compute.preference import STAT_KEYS, PreferenceObjective, pair_batches, reply_logps
from deltatune.data import Example, TokenizedExample, collate
from deltatune.data.pairs import TokenizedPair
from deltatune.data.tools import ToolCall, parse_tool_calls
from deltatune.infer.generate import generate


@torch.no_grad()
def eval_loss(
    model: nn.Module,
    examples: list[TokenizedExample],
    *,
    task: str,
    batch_size: int,
    mode: str,
    pad_id: int,
    device: torch.device,
    chunked: bool = True,
) -> dict[str, float]:
    """Return the token-mean loss (and perplexity, or accuracy for classifiers) over ``examples``
    (``chunked=False``: the output layer, then the loss, as ``train.chunked_loss: false`` asks)."""
    was_training = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], mode=mode, pad_id=pad_id, task=task,
                            block_mask=not packed_attention_enabled(model))
            batch = {k: v.to(device) for k, v in batch.items()}
            if task == "classification":
                loss, n, ok = classification_loss_sum(model, batch)
                correct += ok
            else:
                loss, n = causal_lm_loss_sum(model, batch, chunked=chunked)
            total += float(loss)
            count += n
    finally:
        model.train(was_training)
    mean = total / max(count, 1)
    if task == "classification":
        return {"eval_loss": mean, "eval_accuracy": correct / max(count, 1)}
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0))}


ReferenceLogps = Callable[[dict[str, torch.Tensor], Sequence[int]], torch.Tensor]


@torch.no_grad()
def eval_pairs(model: nn.Module, pairs: list[TokenizedPair], objective: PreferenceObjective, *,
               reference: ReferenceLogps | None, batch_size: int, pass_tokens: int | None, device: torch.device,
               chunked: bool = True) -> dict[str, float]:
    """Return a preference objective's figures on held-out pairs: ``eval_loss`` (the objective, averaged as in
    training), the mean rewards of chosen and rejected replies, the mean reward margin and the reward accuracy
    (share of pairs whose chosen reply gets the higher reward). ``reference(batch, indices)`` gives the reference
    log-probabilities (dpo, ipo)."""
    was_training = model.training
    model.eval()
    sums = dict.fromkeys(("pair_loss", "nll", "chosen_tokens", *STAT_KEYS), 0.0)
    try:
        for run, batch in pair_batches(pairs, batch_size=batch_size, pass_tokens=pass_tokens,
                                       block_mask=not packed_attention_enabled(model), device=device):
            ref = reference(batch, run) if reference is not None and objective.needs_reference else None
            logps, counts = reply_logps(model, batch, chunked=chunked)
            terms = objective.terms(logps, counts, ref)
            sums["pair_loss"] += float(terms.loss.sum())
            if terms.nll_sum is not None:
                sums["nll"] += float(terms.nll_sum)
                sums["chosen_tokens"] += float(counts[0::2].sum())
            for key, value in terms.stats().items():
                sums[key] += value
    finally:
        model.train(was_training)
    n = max(len(pairs), 1)
    loss = sums["pair_loss"] / n + (sums["nll"] / sums["chosen_tokens"] if sums["chosen_tokens"] else 0.0)
    return {"eval_loss": loss, **{f"eval_{key}": sums[key] / n for key in STAT_KEYS}}


def reference_pairs(examples: list[Example]) -> list[tuple[list[dict[str, str]], str]]:
    """Return (prompt messages, reference reply) for chat examples whose last message is the assistant's."""
    pairs = []
    for ex in examples:
        if ex.messages and ex.messages[-1].role == "assistant":
            prompt = [{"role": m.role, "content": m.content} for m in ex.messages[:-1]]
            pairs.append((prompt, ex.messages[-1].content))
    return pairs


def exact_match(model: nn.Module, tokenizer: Any, examples: list[Example], *, limit: int,
                max_new_tokens: int = 32) -> dict[str, Any]:
    """Generate greedily for up to ``limit`` eval examples; return the exact-match share and samples.

    Replies and references are compared after stripping surrounding whitespace.
    """
    pairs = reference_pairs(examples)[:limit]
    if not pairs:
        return {"exact_match": float("nan"), "n": 0, "samples": []}
    refs = [r for _, r in pairs]
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs)
    replies = generate(model, tokenizer, [p for p, _ in pairs],
                       max_new_tokens=min(max_new_tokens, longest + 8), batch_size=32)
    hits = [reply.strip() == ref.strip() for reply, ref in zip(replies, refs, strict=True)]
    samples = [{"prompt": p[-1]["content"], "reference": r, "reply": out}
               for (p, r), out in zip(pairs[:3], replies[:3], strict=True)]
    return {"exact_match": sum(hits) / len(hits), "n": len(hits), "samples": samples}


def has_tool_calls(examples: Sequence[Example]) -> bool:
    """True when some example's conversation has an assistant turn that calls a function."""
    return any(m.tool_calls for ex in examples for m in ex.messages or [])


def _call_key(call: ToolCall) -> tuple[str, str]:
    import json

    return call.name, json.dumps(call.arguments, sort_keys=True)


def tool_call_accuracy(model: nn.Module, tokenizer: Any, examples: list[Example], *, limit: int,
                       max_new_tokens: int = 96, batch_size: int = 16) -> dict[str, Any]:
    """Generate greedily at the assistant turns of held-out tool-calling conversations (each from the conversation
    before it, tools rendered as in training) and compare the calls with the reference's.

    Returns ``tool_call_accuracy``: the share of the (up to ``limit``) turns where the reference calls a function
    at which the model makes the same calls: the right function names and arguments that parse as JSON and equal
    the reference's as objects (key order and whitespace do not matter, types do); ``tool_call_parse_rate``: the
    share of the model's attempted calls that parse; ``tool_call_false_calls``: the share of (up to ``limit``)
    turns where the reference answers in text but the model calls; the counts ``n`` and ``n_text``; samples."""
    call_turns, text_turns = [], []
    for ex in examples:
        for i, m in enumerate(ex.messages or []):
            if m.role == "assistant" and i > 0:
                (call_turns if m.tool_calls else text_turns).append((ex.messages[:i], ex.tools, m))  # type: ignore[index]
    call_turns, text_turns = call_turns[:limit], text_turns[:limit]
    if not call_turns:
        return {"tool_call_accuracy": float("nan"), "n": 0, "samples": []}
    replies = generate(model, tokenizer, [p for p, _, _ in call_turns], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, tools=[t for _, t, _ in call_turns])
    # a text turn only needs to show whether the model starts a call: a few tokens
    text_replies = generate(model, tokenizer, [p for p, _, _ in text_turns], max_new_tokens=12,
                            batch_size=batch_size, tools=[t for _, t, _ in text_turns]) if text_turns else []
    hits, attempted, parsed = 0, 0, 0
    samples = []
    for (_, _, reference), reply in zip(call_turns, replies, strict=True):
        got = parse_tool_calls(reply)
        attempted += got.attempted
        parsed += len(got.calls)
        ok = sorted(map(_call_key, got.calls)) == sorted(map(_call_key, reference.tool_calls or []))
        hits += ok
        if len(samples) < 3:
            samples.append({"reference": [c.as_json() for c in reference.tool_calls or []], "reply": reply, "ok": ok})
    false_calls = sum(parse_tool_calls(r).attempted > 0 or "<tool_call>" in r for r in text_replies)
    return {"tool_call_accuracy": hits / len(call_turns), "tool_call_parse_rate": parsed / attempted if attempted
            else float("nan"), "tool_call_false_calls": false_calls / len(text_turns) if text_turns else float("nan"),
            "n": len(call_turns), "n_text": len(text_turns), "samples": samples}
