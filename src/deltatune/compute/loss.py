"""Losses that compute only what is needed: the output layer runs on supervised positions only.

A causal LM's output layer (576 x 49152 on SmolLM2) is the most expensive matmul of a step, and most
positions of an SFT batch are prompt tokens whose logits nobody uses. The model is asked for logits
only at the positions whose next token is supervised (transformers' ``logits_to_keep`` with an index
tensor), so the loss is the same number at a fraction of the cost.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.compute.attention import varlen_kwargs
from deltatune.compute.chunked_ce import hidden_states_at, linear_cross_entropy_sum, plain_output_layer

IGNORE = -100


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Return True if the model's forward takes ``logits_to_keep`` (most transformers causal LMs)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Return the model's forward arguments for a collated batch: its tensors, and for a packed row
    without a block mask the example boundaries that packed attention reads (train/attention.py)."""
    keys = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
    inputs: dict[str, Any] = {k: batch[k] for k in keys if k in batch}
    if "seq_lens" in batch and "attention_mask" not in batch:
        inputs.update(varlen_kwargs(batch["seq_lens"]))
    return inputs


def causal_lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], sparse_logits: bool = True,
                       chunked: bool = True) -> tuple[torch.Tensor, int]:
    """Return (summed next-token cross-entropy over supervised tokens, number of supervised tokens).

    With ``chunked`` (and a plain output layer, see train/chunked_ce.py) the model returns its hidden
    states at the supervised positions and the output layer runs inside the loss, chunk by chunk, so the
    full logits never exist at once. ``model`` is the model itself, not a distributed wrapper."""
    targets = batch["labels"][:, 1:]  # (B, T-1): the token each position predicts
    supervised = targets != IGNORE
    count = int(supervised.sum())
    inputs = model_inputs(batch)
    if sparse_logits and accepts_logits_to_keep(model):
        keep = supervised.any(dim=0).nonzero().squeeze(1)  # (N,) positions with a supervised next token
        chosen = targets[:, keep]  # (B, N)
        head = plain_output_layer(model) if chunked else None
        if head is not None:
            with hidden_states_at(model):
                hidden = model(**inputs, logits_to_keep=keep).logits  # (B, N, d)
            return linear_cross_entropy_sum(hidden.reshape(-1, hidden.shape[-1]), head.weight,
                                            chosen.reshape(-1)), count
        logits = model(**inputs, logits_to_keep=keep).logits  # (B, N, V)
    else:
        logits = model(**inputs).logits[:, :-1]
        chosen = targets
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), chosen.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, count


def classification_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]
                            ) -> tuple[torch.Tensor, int, int]:
    """Return (summed cross-entropy, number of examples, number of correct predictions)."""
    logits = model(**model_inputs(batch)).logits  # (B, num_labels)
    labels = batch["labels"]
    loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    correct = int((logits.argmax(-1) == labels).sum())
    return loss, int(labels.numel()), correct


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], task: str, chunked: bool = True
             ) -> tuple[torch.Tensor, int]:
    """Return (summed loss, count of items it sums over) for either task; ``chunked=False`` for a model
    wrapped for distributed training (its output layer must run inside its own forward)."""
    if task == "classification":
        loss, count, _ = classification_loss_sum(model, batch)
        return loss, count
    return causal_lm_loss_sum(model, batch, chunked=chunked)
