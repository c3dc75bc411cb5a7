"""The training loop, laid out as setup -> train -> save -> cleanup.

    result = train(load_config("run.yaml"))

Each optimizer step takes ``grad_accum`` micro-batches of ``batch_size`` examples. The loss is the mean
over every supervised token of the whole step (each micro-batch's summed loss is divided by the step's
token count before backward), so accumulating gives exactly what one large batch would.

Under torchrun (``WORLD_SIZE`` > 1) a step takes ``grad_accum`` x ``world`` micro-batches, split across
the ranks, with the token count summed over all of them (train/distributed.py explains the split); rank 0
alone prints and writes files. In a single process none of that code runs.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltatune.config import RunConfig, dump_config
from deltatune.data import padding_waste, plan_batches
from deltatune.delta import save_delta
from deltatune.errors import DeltatuneError
from deltatune.evaluate import eval_loss, exact_match
from deltatune.files import write_text_atomic
from deltatune.methods import build_method, head_names, trainable_parameters
from deltatune.models import load_model, prepare_for_training
from deltatune.training.attention import enable_packed_attention
from deltatune.training.card import model_card, summarize_parameters
from deltatune.training.checkpoint import (
    TrainState,
    checkpoint_dirs,
    load_extra,
    load_trainable,
    newest_intact_checkpoint,
    read_state,
    save_checkpoint,
)
from deltatune.training.distributed import (
    DistContext,
    full_tensors,
    gathered,
    init_distributed,
    is_comm_failure,
    load_optimizer_state,
    optimizer_state,
    rank_config,
    step_share,
    teardown,
    unwrap,
    wrap_model,
)
from deltatune.training.fused import use_fused_modules
from deltatune.training.optim import build_optimizer, build_scheduler, peak_learning_rates
from deltatune.training.progress import MetricsLog, Progress
from deltatune.training.setup import (
    METRICS_FILE,
    RUN_FILE,
    load_run_data,
    prepare_output_dir,
    tokenize_run_data,
)
from deltatune.training.step import StepRun, probe_loss
from deltatune.training.step import run_step as _step


class Interrupted(DeltatuneError):
    """Training was stopped with Ctrl-C or SIGTERM (in a single process, after a checkpoint was written).
    ``exit_code`` is the shell's convention for the signal: 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and containers send to stop a job), raised where the run is, as Ctrl-C is."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated` (a KeyboardInterrupt), so a run stops as on Ctrl-C:
    checkpoint, one line. Only the main thread can set a handler; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class RankFailure(DeltatuneError):
    """Under torchrun, a collective failed: another rank died or did not answer within train.dist_timeout.

    ``exit_at_once`` tells the CLI to leave with ``os._exit`` after printing: a broken gloo group keeps
    native threads whose destructors can call ``std::terminate`` at interpreter exit (SIGABRT instead of 2).
    """

    exit_at_once = True


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
    train_tokens: int = 0  # non-padding tokens the step loop of this call processed (since a resume)


def _say(text: str) -> None:
    print(text, flush=True)


def _quiet(text: str) -> None:
    return None


def train(cfg: RunConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.data`` and write the delta to ``cfg.output.dir``; return the result.

    With ``resume`` the newest checkpoint in the output folder is restored and training continues to
    the same result an uninterrupted run gives. Ctrl-C writes a checkpoint and raises Interrupted (under
    torchrun it writes none: resume from the last ``train.save_every`` checkpoint). Under torchrun every
    rank calls this; a failed collective raises RankFailure naming the last complete checkpoint.
    """
    with sigterm_as_interrupt(), contextlib.ExitStack() as stack:  # the stack holds the output folder's lock
        ctx = init_distributed(cfg)
        if not ctx.enabled:
            return _train(cfg, ctx, resume, progress, stack)
        return _train_distributed(cfg, ctx, resume, progress, stack)


def _train_distributed(cfg: RunConfig, ctx: DistContext, resume: bool, progress: bool,
                       stack: contextlib.ExitStack) -> TrainResult:
    try:
        return _train(rank_config(cfg, ctx), ctx, resume, progress, stack)
    except RuntimeError as err:
        if not is_comm_failure(err):
            raise
        ckpts = checkpoint_dirs(Path(cfg.output.dir))
        reason = re.sub(r"^\[[^\]]*\]\s*", "", (str(err).strip().splitlines() or [type(err).__name__])[0])
        reason = reason.split(". ")[0][:200]  # gloo: "[file:line] Connection closed by peer ...", NCCL: "Watchdog..."
        raise RankFailure(f"rank {ctx.rank}: lost contact with the other ranks ({reason}); the job stops. Last "
                          f"complete checkpoint: {ckpts[-1] if ckpts else 'none'}; rerun with --resume") from None
    finally:
        teardown(ctx)


def _train(cfg: RunConfig, ctx: DistContext, resume: bool, progress: bool,
           stack: contextlib.ExitStack) -> TrainResult:
    started = time.perf_counter()
    say = _say if ctx.is_main else _quiet
    if cfg.train.max_seconds and ctx.enabled:  # each rank's clock would stop it at a different step
        raise DeltatuneError("train.max_seconds works in a single process only; under torchrun set train.max_steps")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    # the user's data is read and checked before output.overwrite may clear an old run
    data = load_run_data(cfg, Path(cfg.output.dir), None) if cfg.data.train is not None else None
    out = ctx.main_first(lambda: prepare_output_dir(cfg, resume, stack)) or Path(cfg.output.dir)
    if data is None:  # the demo writes its generated data into the (prepared) output folder
        with tempfile.TemporaryDirectory(prefix="deltatune-") as private:  # demo data of ranks other than 0
            data = load_run_data(cfg, out, None if ctx.is_main else Path(private))
    if ctx.is_main:
        write_text_atomic(out / RUN_FILE, dump_config(cfg))
    state, last = TrainState(world_size=ctx.world), None
    if resume:
        if not checkpoint_dirs(out):
            raise DeltatuneError(f"rank {ctx.rank}: no checkpoint in {out}; resuming under torchrun needs "
                                 "output.dir on a filesystem every rank reads")
        last = newest_intact_checkpoint(out, say)
        if last is None:
            raise DeltatuneError(f"{out}: every checkpoint is damaged (see above); start a new output.dir")
        state = read_state(last, ctx.world)  # before any model is loaded
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
    say(summarize_parameters(model, params, method))
    say(prepare_for_training(model, cfg.train))
    say(f"data: {report.summary()}; eval {len(eval_set)} examples")

    t = cfg.train
    mode = cfg.data.batching if data.task == "causal_lm" else ("pad" if cfg.data.batching == "pad" else "bucket")
    if (mode == "pack" and data.task == "causal_lm" and t.packed_attention and method.packed_attention
            and enable_packed_attention(model)):
        say("attention: packed rows attend per example (no block mask)")
    if data.task == "causal_lm" and t.fused_modules and use_fused_modules(model):
        say("fused RMSNorm/SwiGLU: norms and feed-forwards keep fewer activations for backward (same math)")
    lengths = [len(ex.input_ids) for ex in train_set]
    per_step = t.grad_accum * ctx.world  # micro-batches per optimizer step, over all ranks
    micro_per_epoch = math.ceil(len(train_set) / t.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / per_step)
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    waste = padding_waste(lengths, plan_batches(lengths, batch_size=t.batch_size, mode=mode, seed=t.seed, epoch=0),
                          mode)
    ranks = f" x {ctx.world} ranks = {t.batch_size * per_step}" if ctx.enabled else ""
    say(f"batching: {mode}, padding waste {waste:.1%}; {total_steps} steps of {t.batch_size} x {t.grad_accum}"
        f"{ranks} examples ({steps_per_epoch} steps per epoch)")

    pad_id = tokenizer.pad_token_id or 0
    result = TrainResult(output_dir=out, steps=state.step, train_loss=None)
    result.trainable_params = sum(p.numel() for p in params.values())
    result.total_params = sum(p.numel() for p in model.parameters())
    if last is not None:
        load_trainable(last, params)
    inner = model
    if ctx.enabled:
        say(f"distributed: {ctx.kind} on {ctx.world} ranks ({ctx.backend})")
        probe = train_set[0]
        model = wrap_model(model, ctx, lambda m: probe_loss(m, method, probe, mode, pad_id, data.task, device))
        inner = unwrap(model)
        params = trainable_parameters(inner)  # FSDP replaced them by sharded ones
        torch.manual_seed(t.seed + ctx.rank)  # each rank its own dropout stream
    lr, head_lr = peak_learning_rates(t, cfg.method, data.task)
    lr_of = {f"{head}.{n}": head_lr for head in head_names(inner)
             for n, _ in inner.get_submodule(head).named_parameters()}
    lr_of.update(method.learning_rates(inner, lr))
    say(f"learning rate {lr:g}{'' if t.lr else f' ({cfg.method.name} default; set train.lr to change)'}"
        + (f", classifier head {head_lr:g}" if head_names(inner) else ""))
    switches = method.rate_switches(inner, lr, total_steps)
    for text in sorted({f"from step {sw.at_step + 1} on, {cfg.method.name} trains {n.rsplit('.', 1)[-1]} at {sw.rate:g}"
                        for n, sw in switches.items()}):
        say(text)
    optimizer = build_optimizer(params, t, lr, lr_of, switches)
    main_group = next((i for i, g in enumerate(optimizer.param_groups) if g["lr"] == lr), 0)
    scheduler = build_scheduler(optimizer, t, total_steps)
    if last is not None:
        extra = load_extra(last)
        load_optimizer_state(model, optimizer, extra["optimizer"], ctx)
        scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["rng_per_rank"][ctx.rank] if "rng_per_rank" in extra else extra["rng"])
        method.after_step(inner, state.step - 1, total_steps)  # restore step-dependent state (a fixed mask)
        say(f"resumed from {last} (step {state.step})")
    metrics = MetricsLog(out / METRICS_FILE, keep_until_step=state.step if resume else None, enabled=ctx.is_main)

    def checkpoint() -> Path | None:
        """Write a checkpoint (rank 0; every rank takes part in gathering the state); return its folder."""
        tensors = full_tensors(params)
        extra = {"optimizer": optimizer_state(model, optimizer, ctx), "scheduler": scheduler.state_dict(),
                 "rng": torch.get_rng_state()}
        if ctx.enabled:
            extra["rng_per_rank"] = ctx.gather_objects(torch.get_rng_state())
        return save_checkpoint(out, state, tensors, extra) if ctx.is_main else None

    def evaluate(step: int) -> dict[str, float]:
        # every rank evaluates the whole eval set (an FSDP forward needs every rank); rank 0 logs
        if not eval_set:
            return {}
        figures = eval_loss(inner, eval_set, task=data.task, batch_size=t.batch_size, mode=mode, pad_id=pad_id,
                            device=device, chunked=t.chunked_loss)
        metrics.write({"step": step, **figures})
        return figures

    def generations(step: int, when: str) -> dict[str, Any]:
        if not t.eval_generations or data.task != "causal_lm" or not data.eval:
            return {}
        result = exact_match(inner, tokenizer, data.eval, limit=t.eval_generations)
        metrics.write({"step": step, "exact_match": result["exact_match"], "exact_match_n": result["n"]})
        say(f"exact match {when}: {result['exact_match']:.1%} of {result['n']} held-out examples")
        for s in result["samples"][:2]:
            say(f"  {s['prompt']!r} -> {s['reply']!r} (want {s['reference']!r})")
        return result

    if resume:  # the start figures were measured before the interruption
        for record in metrics.records():
            if record.get("step") == 0:
                result.eval_start.update({k: v for k, v in record.items() if k.startswith("eval_")})
                if "exact_match" in record:
                    result.generation_start = {"exact_match": record["exact_match"], "n": record["exact_match_n"]}
    if state.step == 0:
        result.eval_start = evaluate(0)
        if result.eval_start:
            say("eval at start: " + _fmt(result.eval_start))
        result.generation_start = generations(0, "before training")

    loop_started, paused = time.perf_counter(), 0.0
    deadline = loop_started + t.max_seconds if t.max_seconds else math.inf
    tokens_before = state.tokens_seen
    bar = Progress(total_steps, state.step, enabled=progress and ctx.is_main)
    model.train()
    run = StepRun(model, inner, method, train_set, mode, pad_id, data.task, device, t, params, optimizer, ctx)
    last_loss: float | None = None
    try:
        while state.step < total_steps:
            plan = plan_batches(lengths, batch_size=t.batch_size, mode=mode, seed=t.seed, epoch=state.epoch)
            while state.cursor < len(plan) and state.step < total_steps:
                group = plan[state.cursor:state.cursor + per_step]
                share = step_share(group, ctx.rank, ctx.world) if ctx.enabled else [(idx, True) for idx in group]
                last_loss, tokens, grad_norm = _step(run, share)
                scheduler.step()
                method.after_step(inner, state.step, total_steps)
                state.step += 1
                state.cursor += len(group)
                state.tokens_seen += tokens
                lr_now = scheduler.get_last_lr()[main_group]
                rate = bar.update(last_loss, lr_now, tokens)
                if state.step % t.log_every == 0 or state.step == total_steps:
                    metrics.write({"step": state.step, "epoch": state.epoch, "loss": last_loss, "lr": lr_now,
                                   "grad_norm": grad_norm, "tokens": state.tokens_seen, "tokens_per_s": rate})
                pause = time.perf_counter()  # evaluations and checkpoints do not count as training time
                if t.eval_every and state.step % t.eval_every == 0 and state.step < total_steps:
                    figures = evaluate(state.step)
                    if ctx.is_main:
                        bar.write(f"step {state.step}: " + _fmt(figures))
                if t.save_every and state.step % t.save_every == 0 and state.step < total_steps:
                    checkpoint()
                paused += time.perf_counter() - pause
                if time.perf_counter() >= deadline:  # train.max_seconds: stop after the step that used it up
                    break
            if state.cursor >= len(plan):
                state.epoch, state.cursor = state.epoch + 1, 0
            if time.perf_counter() >= deadline:
                break
    except KeyboardInterrupt as stop:
        optimizer.zero_grad(set_to_none=True)
        bar.close()
        metrics.close()
        how, code = ("stopped by SIGTERM", 143) if isinstance(stop, Terminated) else ("interrupted", 130)
        if ctx.enabled:  # the ranks may stop at different points, so no collective (no checkpoint) is safe
            done = checkpoint_dirs(out)[-1:] or ["none"]
            raise Interrupted(f"{how} at step {state.step}; last complete checkpoint: {done[0]}; "
                              "continue with the same command and --resume", code) from None
        ckpt = checkpoint()
        raise Interrupted(f"{how} at step {state.step}; checkpoint written to {ckpt}; "
                          "continue with the same command and --resume", code) from None
    bar.close()
    result.train_seconds = time.perf_counter() - loop_started - paused
    result.train_tokens = state.tokens_seen - tokens_before
    if state.step < total_steps:
        say(f"time budget train.max_seconds={t.max_seconds:g} used up: stopped after step {state.step} of "
            f"{total_steps}")
    model.eval()
    checkpoint()
    method.finalize(inner)
    result.steps, result.train_loss = state.step, last_loss
    result.eval_end = evaluate(state.step)
    if result.eval_end:
        say("eval at end: " + _fmt(result.eval_end))
    result.generation_end = generations(state.step, "after training")
    metrics.close()
    result.seconds = time.perf_counter() - started
    with gathered(inner, ctx):  # FSDP: whole tensors on every rank for the moment of saving
        if ctx.is_main:
            card = model_card(cfg, data, loaded.source, result, method)
            save_delta(out, method, inner, loaded.source, task=data.task, card=card)
            say(f"delta written to {out}/ ({os.path.getsize(out / 'adapter_model.safetensors') / 1e6:.1f} MB)")
    return result


def _fmt(figures: dict[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in figures.items())
