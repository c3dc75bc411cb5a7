"""The training loop, laid out as setup -> train -> save -> cleanup.

    result = train(load_config("run.yaml"))

Each optimizer step takes ``grad_accum`` micro-batches of ``batch_size`` examples. The loss is the mean
over every supervised token of the whole step (each micro-batch's summed loss is divided by the step's
token count before backward), so accumulating gives exactly what one large batch would.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltatune.config import RunConfig, dump_config
from deltatune.data import TokenizedExample, collate, padding_waste, plan_batches
from deltatune.delta import save_delta, write_text_atomic
from deltatune.errors import DeltatuneError
from deltatune.evaluate import eval_loss, exact_match
from deltatune.methods import Method, build_method, trainable_parameters
from deltatune.models import load_model
from deltatune.train.card import model_card, summarize_parameters
from deltatune.train.checkpoint import TrainState, checkpoint_dirs, load_checkpoint, save_checkpoint
from deltatune.train.loss import loss_sum
from deltatune.train.optim import build_optimizer, build_scheduler
from deltatune.train.progress import MetricsLog, Progress
from deltatune.train.setup import (
    RUN_FILE,
    load_run_data,
    prepare_output_dir,
    tokenize_run_data,
)


class Interrupted(DeltatuneError):
    """Training was stopped with Ctrl-C after a checkpoint was written."""


@dataclass
class TrainResult:
    """What a finished run produced and measured."""

    output_dir: Path
    steps: int
    train_loss: float | None
    eval_start: dict[str, float] = field(default_factory=dict)
    eval_end: dict[str, float] = field(default_factory=dict)
    generation_start: dict[str, Any] = field(default_factory=dict)
    generation_end: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    train_seconds: float = 0.0  # the step loop alone (no loading, no eval)
    trainable_params: int = 0
    total_params: int = 0


def _say(text: str) -> None:
    print(text, flush=True)


def train(cfg: RunConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.data`` and write the delta to ``cfg.output.dir``; return the result.

    With ``resume`` the newest checkpoint in the output folder is restored and training continues to
    the same result an uninterrupted run gives. Ctrl-C writes a checkpoint and raises Interrupted.
    """
    started = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = prepare_output_dir(cfg, resume)
    data = load_run_data(cfg, out)
    write_text_atomic(out / RUN_FILE, dump_config(cfg))
    id2label = {v: k for k, v in data.label2id.items()} if data.label2id else None
    torch.manual_seed(cfg.train.seed)
    loaded = load_model(cfg.model, task=data.task, num_labels=len(id2label) if id2label else None,
                        id2label=id2label)
    model, tokenizer, device = loaded.model, loaded.tokenizer, loaded.device
    train_set, eval_set, report = tokenize_run_data(cfg, data, tokenizer)
    method = build_method(cfg.method)
    method.attach(model)
    params = trainable_parameters(model)
    if not params:
        raise DeltatuneError(f"method {cfg.method.name!r} left nothing to train on this model")
    _say(summarize_parameters(model, params, method))
    _say(f"data: {report.summary()}; eval {len(eval_set)} examples")

    t = cfg.train
    mode = cfg.data.batching if data.task == "causal_lm" else ("pad" if cfg.data.batching == "pad" else "bucket")
    lengths = [len(ex.input_ids) for ex in train_set]
    micro_per_epoch = math.ceil(len(train_set) / t.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / t.grad_accum)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    waste = padding_waste(lengths, plan_batches(lengths, batch_size=t.batch_size, mode=mode, seed=t.seed, epoch=0),
                          mode)
    _say(f"batching: {mode}, padding waste {waste:.1%}; {total_steps} steps of {t.batch_size} x {t.grad_accum} "
         f"examples ({steps_per_epoch} steps per epoch)")

    optimizer = build_optimizer(params, t)
    scheduler = build_scheduler(optimizer, t, total_steps)
    state = TrainState()
    if resume:
        last = checkpoint_dirs(out)[-1]
        state = load_checkpoint(last, params, optimizer, scheduler)
        _say(f"resumed from {last} (step {state.step})")
    metrics = MetricsLog(out / "metrics.jsonl", keep_until_step=state.step if resume else None)
    pad_id = tokenizer.pad_token_id or 0

    def evaluate(step: int) -> dict[str, float]:
        if not eval_set:
            return {}
        figures = eval_loss(model, eval_set, task=data.task, batch_size=t.batch_size, mode=mode, pad_id=pad_id,
                            device=device)
        metrics.write({"step": step, **figures})
        return figures

    def generations(step: int, when: str) -> dict[str, Any]:
        if not t.eval_generations or data.task != "causal_lm" or not data.eval:
            return {}
        result = exact_match(model, tokenizer, data.eval, limit=t.eval_generations)
        metrics.write({"step": step, "exact_match": result["exact_match"], "exact_match_n": result["n"]})
        _say(f"exact match {when}: {result['exact_match']:.1%} of {result['n']} held-out examples")
        for s in result["samples"][:2]:
            _say(f"  {s['prompt']!r} -> {s['reply']!r} (want {s['reference']!r})")
        return result

    result = TrainResult(output_dir=out, steps=state.step, train_loss=None)
    if resume:  # the start figures were measured before the interruption
        for record in metrics.records():
            if record.get("step") == 0:
                result.eval_start.update({k: v for k, v in record.items() if k.startswith("eval_")})
                if "exact_match" in record:
                    result.generation_start = {"exact_match": record["exact_match"], "n": record["exact_match_n"]}
    if state.step == 0:
        result.eval_start = evaluate(0)
        if result.eval_start:
            _say("eval at start: " + _fmt(result.eval_start))
        result.generation_start = generations(0, "before training")

    result.trainable_params = sum(p.numel() for p in params.values())
    result.total_params = sum(p.numel() for p in model.parameters())
    loop_started = time.perf_counter()
    bar = Progress(total_steps, state.step, enabled=progress)
    model.train()
    last_loss: float | None = None
    try:
        while state.step < total_steps:
            plan = plan_batches(lengths, batch_size=t.batch_size, mode=mode, seed=t.seed, epoch=state.epoch)
            while state.cursor < len(plan) and state.step < total_steps:
                group = plan[state.cursor:state.cursor + t.grad_accum]
                last_loss, tokens, grad_norm = _step(model, method, group, train_set, mode, pad_id, data.task,
                                                     device, t, params, optimizer)
                scheduler.step()
                method.after_step(model, state.step, total_steps)
                state.step += 1
                state.cursor += len(group)
                state.tokens_seen += tokens
                lr = scheduler.get_last_lr()[0]
                rate = bar.update(last_loss, lr, tokens)
                if state.step % t.log_every == 0 or state.step == total_steps:
                    metrics.write({"step": state.step, "epoch": state.epoch, "loss": last_loss, "lr": lr,
                                   "grad_norm": grad_norm, "tokens": state.tokens_seen, "tokens_per_s": rate})
                if t.eval_every and state.step % t.eval_every == 0 and state.step < total_steps:
                    bar.write(f"step {state.step}: " + _fmt(evaluate(state.step)))
                if t.save_every and state.step % t.save_every == 0 and state.step < total_steps:
                    save_checkpoint(out, state, params, optimizer, scheduler)
            if state.cursor >= len(plan):
                state.epoch, state.cursor = state.epoch + 1, 0
    except KeyboardInterrupt:
        optimizer.zero_grad(set_to_none=True)
        bar.close()
        ckpt = save_checkpoint(out, state, params, optimizer, scheduler)
        metrics.close()
        raise Interrupted(f"interrupted at step {state.step}; checkpoint written to {ckpt}; "
                          "continue with the same command and --resume") from None
    bar.close()
    result.train_seconds = time.perf_counter() - loop_started
    model.eval()
    save_checkpoint(out, state, params, optimizer, scheduler)
    method.finalize(model)
    result.steps, result.train_loss = state.step, last_loss
    result.eval_end = evaluate(state.step)
    if result.eval_end:
        _say("eval at end: " + _fmt(result.eval_end))
    result.generation_end = generations(state.step, "after training")
    metrics.close()
    result.seconds = time.perf_counter() - started
    card = model_card(cfg, data, loaded.source, result, method)
    save_delta(out, method, model, loaded.source, task=data.task, card=card)
    _say(f"delta written to {out}/ ({os.path.getsize(out / 'adapter_model.safetensors') / 1e6:.1f} MB)")
    return result


def _step(model: torch.nn.Module, method: Method, group: list[list[int]], dataset: list[TokenizedExample], mode: str,
          pad_id: int, task: str, device: torch.device, t: Any, params: dict[str, torch.nn.Parameter],
          optimizer: torch.optim.Optimizer) -> tuple[float, int, float | None]:
    """Run one optimizer step over the micro-batches of ``group``; return (loss, tokens, grad norm)."""
    batches = [collate([dataset[i] for i in idx], mode=mode, pad_id=pad_id, task=task) for idx in group]
    total = sum(int(b["num_supervised"]) for b in batches)
    tokens = sum(int(b["num_tokens"]) for b in batches)
    step_loss = 0.0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, _ = loss_sum(model, batch, task)
        scaled = loss / max(total, 1)
        reg = method.regularization(model)
        if reg is not None:  # a per-step penalty, spread evenly over the step's micro-batches
            scaled = scaled + reg / len(batches)
        scaled.backward()
        step_loss += float(loss.detach())
    grad_norm = None
    if t.max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), t.max_grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss / max(total, 1), tokens, grad_norm


def _fmt(figures: dict[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in figures.items())
