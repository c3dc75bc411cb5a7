"""Evaluation: loss and perplexity, accuracy for classifiers, exact match on generated replies."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from deltatune.compute.attention import packed_attention_enabled
from deltatune.compute.loss import causal_lm_loss_sum, classification_loss_sum
from deltatune.data import Example, TokenizedExample, collate
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
