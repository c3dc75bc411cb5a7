"""One optimizer step over this rank's micro-batches, in a single process or under torchrun.

The loss of a step is the sum of its micro-batches' summed token losses divided by the step's supervised
token count N (over every rank under torchrun), so accumulating, or splitting over ranks, gives the
gradient one large batch would (train/distributed.py shows why the loss is scaled by the world size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from deltatune.compute.attention import packed_attention_enabled
from deltatune.compute.loss import loss_sum
from deltatune.compute.precision import Precision, autocast, shape_step
from deltatune.compute.preference import STAT_KEYS, PreferenceObjective, reply_logps
from deltatune.data import TokenizedExample, collate, split_by_tokens
from deltatune.data.pairs import TokenizedPair, collate_pairs
from deltatune.methods import Method
from deltatune.training.distributed import DistContext, as_float, micro_batch

if TYPE_CHECKING:
    from deltatune.training.preference import Reference


@dataclass
class StepRun:
    """What every optimizer step needs: the model to step (maybe wrapped) and the one inside, the data."""

    model: torch.nn.Module
    inner: torch.nn.Module
    method: Method
    dataset: list[TokenizedExample] | list[TokenizedPair]
    mode: str
    pad_id: int
    task: str
    device: torch.device
    t: Any
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    ctx: DistContext
    objective: PreferenceObjective | None = None
    reference: Reference | None = None
    precision: Precision | None = None  # bf16-mixed: each forward under autocast (never across optimizer steps)


Share = list[tuple[list[int], bool]]


def run_step(run: StepRun, share: Share) -> tuple[float, int, float | None, dict[str, float]]:
    """Run one optimizer step over this rank's micro-batches ``share`` (``(indices, real)`` pairs; a pass
    that is not real has weight 0); return (loss, tokens, grad norm, the objective's figures) of the whole step,
    over every rank (the figures: the preference objectives' reward means, else none)."""
    if run.objective is not None:
        return _preference_step(run, share)
    ctx = run.ctx
    if run.mode == "pack" and run.task == "causal_lm":  # long packed rows run as several bounded passes
        lengths = {i: len(run.dataset[i].input_ids) for idx, _ in share for i in idx}
        share = [(part, real) for idx, real in share for part in split_by_tokens(idx, lengths, run.t.pass_tokens)]
    block_mask = not packed_attention_enabled(run.inner)
    batches = [collate([run.dataset[i] for i in idx], mode=run.mode, pad_id=run.pad_id, task=run.task,
                       block_mask=block_mask, pad_multiple=_row_multiple(run)) for idx, _ in share]
    real = [r for _, r in share]
    counts = [sum(int(b["num_supervised"]) for b, r in zip(batches, real, strict=True) if r),
              sum(int(b["num_tokens"]) for b, r in zip(batches, real, strict=True) if r)]
    total, tokens = (int(c) for c in ctx.all_reduce_sum(counts))  # the step's global token counts
    step_loss = 0.0
    for k, batch in enumerate(batches):
        batch = {key: v.to(run.device) for key, v in batch.items()}
        with micro_batch(run.model, ctx, sync=k == len(batches) - 1):
            with autocast(run.precision, run.device):
                loss, _ = loss_sum(run.model, batch, run.task, chunked=run.t.chunked_loss and not ctx.enabled)
            scaled = loss / max(total, 1)
            if ctx.enabled:  # the ranks' gradients are averaged: x world gives their sum
                scaled = scaled * (ctx.world if real[k] else 0.0)
            reg = run.method.regularization(run.inner)
            if reg is not None:  # a per-step penalty, spread evenly over the step's micro-batches
                scaled = scaled + reg / len(batches)
            scaled.backward()
        if real[k]:
            step_loss += float(loss.detach())
    grad_norm = _optimizer_step(run)
    if ctx.enabled:
        step_loss = ctx.all_reduce_sum([step_loss])[0]
    return step_loss / max(total, 1), tokens, grad_norm, {}


def _row_multiple(run: StepRun) -> int:
    """On a CPU in bf16 rows are rounded up to 64 tokens, so the kernels torch compiles per shape stay few
    (``precision.shape_step``); 1 otherwise."""
    return shape_step(run.device, run.precision.weight_dtype) if run.precision is not None else 1


def _optimizer_step(run: StepRun) -> float | None:
    """Clip (when asked), step and clear the gradients; return the gradient norm before clipping."""
    grad_norm = None
    if run.t.max_grad_norm:
        grad_norm = as_float(torch.nn.utils.clip_grad_norm_(list(run.params.values()), run.t.max_grad_norm))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _preference_step(run: StepRun, share: Share) -> tuple[float, int, float | None, dict[str, float]]:
    """One optimizer step of a preference objective: the pair terms are averaged over the step's pairs (ORPO's NLL
    over its chosen tokens), every rank and micro-batch counted, so accumulation gives what one batch would."""
    ctx, objective, pairs = run.ctx, run.objective, run.dataset
    assert objective is not None
    lengths = {i: len(pairs[i].input_ids) for idx, _ in share for i in idx}
    share = [(part, real) for idx, real in share for part in split_by_tokens(idx, lengths, run.t.pass_tokens)]
    block_mask = not packed_attention_enabled(run.inner)
    batches = [collate_pairs([pairs[i] for i in idx], block_mask=block_mask,  # type: ignore[misc]
                             pad_multiple=_row_multiple(run)) for idx, _ in share]
    real = [r for _, r in share]
    counts = [sum(float(b["num_pairs"]) for b, r in zip(batches, real, strict=True) if r),
              sum(float((b["sequence"] % 2 == 0).sum()) for b, r in zip(batches, real, strict=True) if r),
              sum(float(b["num_tokens"]) for b, r in zip(batches, real, strict=True) if r)]
    n_pairs, n_chosen, tokens = ctx.all_reduce_sum(counts)
    sums = dict.fromkeys(("loss", *STAT_KEYS), 0.0)
    for k, ((idx, _), batch) in enumerate(zip(share, batches, strict=True)):
        batch = {key: v.to(run.device) for key, v in batch.items()}
        with autocast(run.precision, run.device):
            ref = (run.reference.logps("train", batch, idx) if run.reference is not None and objective.needs_reference
                   else None)
        with micro_batch(run.model, ctx, sync=k == len(batches) - 1):
            with autocast(run.precision, run.device):
                logps, token_counts = reply_logps(run.model, batch, chunked=run.t.chunked_loss and not ctx.enabled)
            terms = objective.terms(logps, token_counts, ref)
            loss = terms.loss.sum() / max(n_pairs, 1)
            if terms.nll_sum is not None:
                loss = loss + terms.nll_sum / max(n_chosen, 1)
            scaled = loss * (ctx.world if real[k] else 0.0) if ctx.enabled else loss
            reg = run.method.regularization(run.inner)
            if reg is not None:
                scaled = scaled + reg / len(batches)
            scaled.backward()
        if real[k]:
            sums["loss"] += float(loss.detach())
            for key, value in terms.stats().items():
                sums[key] += value
    grad_norm = _optimizer_step(run)
    figures = dict(zip(sums, ctx.all_reduce_sum(list(sums.values())), strict=True))
    return figures.pop("loss"), int(tokens), grad_norm, {k: v / max(n_pairs, 1) for k, v in figures.items()}


def probe_loss(model: torch.nn.Module, method: Method, example: TokenizedExample | TokenizedPair, mode: str,
               pad_id: int, task: str, device: torch.device, pairs: bool = False) -> torch.Tensor:
    """Return the loss of one example (with the method's penalty): DDP's probe for unused parameters."""
    block_mask = not packed_attention_enabled(model)
    if pairs:
        batch = {k: v.to(device) for k, v in collate_pairs([example], block_mask=block_mask).items()}  # type: ignore[list-item]
        loss = -reply_logps(model, batch, chunked=False)[0].sum()
    else:
        batch = collate([example], mode=mode, pad_id=pad_id, task=task, block_mask=block_mask)  # type: ignore[list-item]
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, _ = loss_sum(model, batch, task, chunked=False)
    reg = method.regularization(model)
    return loss if reg is None else loss + reg
