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
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from deltatune.compute.attention import enable_packed_attention, packed_attention_enabled
from deltatune.compute.precision import autocast, keep_masters_in_float32, resolve, store_frozen_in_bfloat16
from deltatune.config import RunConfig, dump_config
from deltatune.data import padding_waste, plan_batches
from deltatune.delta import save_delta
from deltatune.errors import DeltatuneError
from deltatune.evaluate import eval_loss, eval_pairs, exact_match, has_tool_calls, tool_call_accuracy
from deltatune.files import write_text_atomic
from deltatune.methods import build_method, head_names, trainable_parameters
from deltatune.models import load_model, pick_device, prepare_for_training
from deltatune.training.callbacks import Callback, CallbackList, default_callbacks, format_figures
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
from deltatune.training.preference import Reference, objective_of, prepare_reference
from deltatune.training.progress import read_metrics
from deltatune.training.result import TrainResult
from deltatune.training.setup import (
    METRICS_FILE,
    RUN_FILE,
    load_run_data,
    prepare_output_dir,
    tokenize_run_data,
)
from deltatune.training.shape import run_shape
from deltatune.training.signals import Interrupted, Terminated, interrupts_between_steps, sigterm_as_interrupt
from deltatune.training.step import StepRun, probe_loss, run_step
from deltatune.training.tracking import check_trackers


class RankFailure(DeltatuneError):
    """Under torchrun, a collective failed: another rank died or did not answer within train.dist_timeout.

    ``exit_at_once`` tells the CLI to leave with ``os._exit`` after printing: a broken gloo group keeps
    native threads whose destructors can call ``std::terminate`` at interpreter exit (SIGABRT instead of 2).
    """

    exit_at_once = True


def _say(text: str) -> None:
    print(text, flush=True)


def _quiet(text: str) -> None:
    return None


def train(cfg: RunConfig, *, resume: bool = False, progress: bool = True,
          callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.data`` and write the delta to ``cfg.output.dir``; return the result.

    With ``resume`` the newest checkpoint in the output folder is restored and training continues to
    the same result an uninterrupted run gives. Ctrl-C writes a checkpoint and raises Interrupted (under
    torchrun it writes none: resume from the last ``train.save_every`` checkpoint). Under torchrun every
    rank calls this; a failed collective raises RankFailure naming the last complete checkpoint.
    ``callbacks`` (see ``training.callbacks``) run after the built-in ones (progress bar, metrics.jsonl,
    periodic evaluation and checkpoints, time budget).
    """
    with sigterm_as_interrupt(), contextlib.ExitStack() as stack:  # the stack holds the output folder's lock
        ctx = init_distributed(cfg)
        if not ctx.enabled:
            return Recipe(cfg, ctx, resume, progress, stack, callbacks).run()
        return _train_distributed(cfg, ctx, resume, progress, stack, callbacks)


def _train_distributed(cfg: RunConfig, ctx: DistContext, resume: bool, progress: bool,
                       stack: contextlib.ExitStack, callbacks: Sequence[Callback]) -> TrainResult:
    try:
        return Recipe(rank_config(cfg, ctx), ctx, resume, progress, stack, callbacks).run()
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


class Recipe:
    """One training run, in four pieces: :meth:`setup` (data, model, method, optimizer, resume), :meth:`fit` (the
    step loop), :meth:`save` (final checkpoint, evaluation, the delta) and :meth:`cleanup`. Callbacks see this
    object: ``state`` (step, epoch, cursor), ``shape`` (batching, step counts), ``is_main``, ``resumed``, and may
    call :meth:`evaluate`, :meth:`checkpoint` and :meth:`request_stop`."""

    def __init__(self, cfg: RunConfig, ctx: DistContext, resume: bool, progress: bool, stack: contextlib.ExitStack,
                 callbacks: Sequence[Callback] = ()) -> None:
        self.cfg, self.ctx, self.resumed, self.progress, self.stack = cfg, ctx, resume, progress, stack
        self.extra_callbacks = list(callbacks)
        self.say = _say if ctx.is_main else _quiet
        self.is_main = ctx.is_main
        self.stop_requested = False
        self._fit_ended = False
        self.paused = 0.0  # seconds of evaluations and checkpoints inside the step loop

    # ---- the recipe ------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Set up, train, save; return the result. Ctrl-C or SIGTERM raises Interrupted after a checkpoint."""
        started = time.perf_counter()
        self.setup()
        try:
            self.fit()
        except KeyboardInterrupt as stop:
            self.interrupted(stop)
        result = self.save()
        result.seconds = time.perf_counter() - started
        self.cleanup(result)
        return result

    def cleanup(self, result: TrainResult | None) -> None:
        """End the run's callbacks (trackers close their runs, files are closed); ``result`` is None when the run
        was interrupted. The output folder's lock is released by the caller's ExitStack, the process group by
        ``train``."""
        self.callbacks.on_train_end(self, result)

    def setup(self) -> None:
        """Read the data, prepare the output folder, load the model, attach the method, build the optimizer and
        the schedule, restore a checkpoint when resuming, and evaluate before training."""
        self._prepare_run()
        self._prepare_model()
        self._prepare_optimizer()
        with self.autocast():
            self._start_figures()

    def fit(self) -> None:
        """The step loop: until the planned steps are done or a callback asks to stop."""
        t, ctx, state = self.cfg.train, self.ctx, self.state
        self.callbacks.on_train_start(self)
        self.loop_started = time.perf_counter()
        self.tokens_before = state.tokens_seen
        self.model.train()
        run = StepRun(self.model, self.inner, self.method, self.train_set, self.shape.mode, self.pad_id, self.task,
                      self.device, t, self.params, self.optimizer, ctx, self.objective, self.reference, self.precision)
        with interrupts_between_steps() as between_steps:
            self._steps(run, between_steps)
            self._fit_ended = True
            self.callbacks.on_fit_end(self)
            between_steps()  # a Ctrl-C during the last step or on_fit_end: stopped as interrupted, with its checkpoint

    def _steps(self, run: StepRun, between_steps: Callable[[], None]) -> None:
        """The steps of :meth:`fit`; ``between_steps`` raises a Ctrl-C or SIGTERM that arrived meanwhile."""
        t, ctx, state, tokens_done = self.cfg.train, self.ctx, self.state, self.tokens_before
        while state.step < self.shape.total_steps and not self.stop_requested:
            plan = plan_batches(self.lengths, batch_size=t.batch_size, mode=self.shape.mode, seed=t.seed,
                                epoch=state.epoch)
            while state.cursor < len(plan) and state.step < self.shape.total_steps and not self.stop_requested:
                between_steps()
                group = plan[state.cursor:state.cursor + self.shape.micro_per_step]
                share = step_share(group, ctx.rank, ctx.world) if ctx.enabled else [(idx, True) for idx in group]
                self.step_examples = [i for idx, real in share if real for i in idx]  # this rank's, for callbacks
                self.last_loss, tokens, grad_norm, figures = run_step(run, share)
                self.scheduler.step()
                self.method.after_step(self.inner, state.step, self.shape.total_steps)
                state.step += 1
                state.cursor += len(group)
                state.tokens_seen += tokens
                elapsed = max(time.perf_counter() - self.loop_started, 1e-9)
                self.callbacks.on_step_end(self, {
                    "step": state.step, "epoch": state.epoch, "loss": self.last_loss,
                    "lr": self.scheduler.get_last_lr()[self.main_group], "grad_norm": grad_norm,
                    "tokens": state.tokens_seen, "tokens_per_s": (state.tokens_seen - tokens_done) / elapsed,
                    **figures, "step_tokens": tokens})
            if state.cursor >= len(plan):
                state.epoch, state.cursor = state.epoch + 1, 0

    def save(self) -> TrainResult:
        """Write the last checkpoint, finalize the method, evaluate, and write the delta with its model card."""
        result, state = self.result, self.state
        result.train_seconds = time.perf_counter() - self.loop_started - self.paused
        result.train_tokens = state.tokens_seen - self.tokens_before
        self.model.eval()
        self.checkpoint()
        self.method.finalize(self.inner)
        result.steps, result.train_loss = state.step, self.last_loss
        with self.autocast():
            result.eval_end = self.evaluate(announce="eval at end")
            result.generation_end = self._generations("after training")
        with gathered(self.inner, self.ctx):  # FSDP: whole tensors on every rank for the moment of saving
            if self.is_main:
                peft_type = self.method.adapter_config(self.inner, self.loaded.source).get("peft_type")
                card = model_card(self.cfg, self.data, self.loaded.source, result, self.method, peft_type)
                save_delta(self.out, self.method, self.inner, self.loaded.source, task=self.task, card=card)
                size = os.path.getsize(self.out / "adapter_model.safetensors") / 1e6
                self.say(f"delta written to {self.out}/ ({size:.1f} MB)")
                self.callbacks.on_save(self, self.out)
        return result

    def interrupted(self, stop: KeyboardInterrupt) -> None:
        """Ctrl-C or SIGTERM during the loop: a checkpoint (single process), then Interrupted with the way on."""
        self.optimizer.zero_grad(set_to_none=True)
        if not self._fit_ended:
            self.callbacks.on_fit_end(self)
        how, code = ("stopped by SIGTERM", 143) if isinstance(stop, Terminated) else ("interrupted", 130)
        step = self.state.step
        if self.ctx.enabled:  # the ranks may stop at different points, so no collective (no checkpoint) is safe
            done = checkpoint_dirs(self.out)[-1:] or ["none"]
            self.cleanup(None)
            raise Interrupted(f"{how} at step {step}; last complete checkpoint: {done[0]}; "
                              "continue with the same command and --resume", code) from None
        ckpt = self.checkpoint()
        self.cleanup(None)
        raise Interrupted(f"{how} at step {step}; checkpoint written to {ckpt}; "
                          "continue with the same command and --resume", code) from None

    # ---- what callbacks may call -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop the loop after the current step (the run then saves as if it had finished)."""
        self.stop_requested = True

    def checkpoint(self) -> Path | None:
        """Write a checkpoint (rank 0; every rank takes part in gathering the state); return its folder."""
        began = time.perf_counter()
        tensors = full_tensors(self.params)
        extra = {"optimizer": optimizer_state(self.model, self.optimizer, self.ctx),
                 "scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state()}
        if self.ctx.enabled:
            extra["rng_per_rank"] = self.ctx.gather_objects(torch.get_rng_state())
        path = save_checkpoint(self.out, self.state, tensors, extra) if self.is_main else None
        if path is not None:
            self.callbacks.on_save(self, path)
        self.paused += time.perf_counter() - began
        return path

    def evaluate(self, announce: str | None = None) -> dict[str, float]:
        """Evaluate on the held-out set (every rank: an FSDP forward needs them all); return the figures."""
        if not self.eval_set:
            return {}
        with self.autocast():
            return self._evaluate(announce)

    def _evaluate(self, announce: str | None) -> dict[str, float]:
        began = time.perf_counter()
        t = self.cfg.train
        if self.objective is not None:
            reference = self.reference
            figures = eval_pairs(self.inner, self.eval_set, self.objective,  # type: ignore[arg-type]
                                 reference=(lambda batch, idx: reference.logps("eval", batch, idx))
                                 if reference is not None else None,
                                 batch_size=t.batch_size, pass_tokens=t.pass_tokens, device=self.device,
                                 chunked=t.chunked_loss)
        else:
            figures = eval_loss(self.inner, self.eval_set, task=self.task,  # type: ignore[arg-type]
                                batch_size=t.batch_size, mode=self.shape.mode, pad_id=self.pad_id,
                                device=self.device, chunked=t.chunked_loss)
        if announce:
            self.say(f"{announce}: " + format_figures(figures))
        self.callbacks.on_eval(self, {"step": self.state.step, **figures})
        self.paused += time.perf_counter() - began
        return figures

    # ---- setup, piece by piece -------------------------------------------------------------------------

    def _prepare_run(self) -> None:
        """Data read and checked, output folder claimed, run.yaml written, checkpoint state read."""
        cfg, ctx = self.cfg, self.ctx
        if cfg.train.max_seconds and ctx.enabled:  # each rank's clock would stop it at a different step
            raise DeltatuneError("train.max_seconds works in a single process only; under torchrun set "
                                 "train.max_steps")
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        check_trackers(cfg.train.report_to)  # a missing extra stops the run before any work
        # the user's data is read and checked before output.overwrite may clear an old run
        data = load_run_data(cfg, Path(cfg.output.dir), None) if cfg.data.train is not None else None
        self.out = ctx.main_first(lambda: prepare_output_dir(cfg, self.resumed, self.stack)) or Path(cfg.output.dir)
        if data is None:  # the demo writes its generated data into the (prepared) output folder
            with tempfile.TemporaryDirectory(prefix="deltatune-") as private:  # demo data of ranks other than 0
                data = load_run_data(cfg, self.out, None if ctx.is_main else Path(private))
        self.data, self.task = data, data.task
        if ctx.is_main:
            write_text_atomic(self.out / RUN_FILE, dump_config(cfg))
        self.state, self.last_ckpt = TrainState(world_size=ctx.world), None
        if self.resumed:
            if not checkpoint_dirs(self.out):
                raise DeltatuneError(f"rank {ctx.rank}: no checkpoint in {self.out}; resuming under torchrun needs "
                                     "output.dir on a filesystem every rank reads")
            self.last_ckpt = newest_intact_checkpoint(self.out, self.say)
            if self.last_ckpt is None:
                raise DeltatuneError(f"{self.out}: every checkpoint is damaged (see above); start a new output.dir")
            self.state = read_state(self.last_ckpt, ctx.world)  # before any model is loaded

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The block in which the model runs: bfloat16 matmuls under ``bf16-mixed``, nothing otherwise. Never hold it
        across optimizer steps: autocast caches its bf16 copies of the float32 parameters until the block ends."""
        return autocast(self.precision, self.loaded.device)

    def _prepare_model(self) -> None:
        """Base loaded, data tokenized, method attached, speed options on, shape decided, DDP/FSDP wrapped."""
        cfg, ctx, data, say = self.cfg, self.ctx, self.data, self.say
        id2label = {v: k for k, v in data.label2id.items()} if data.label2id else None
        torch.manual_seed(cfg.train.seed)
        self.precision = precision = resolve(cfg.train.precision, cfg.model.dtype, pick_device(cfg.model.device))
        say(f"precision: {precision.name} ({precision.reason})")
        model_cfg = cfg.model
        if cfg.model.dtype == "auto":  # bf16-mixed: bf16 weights, but float32 masters where every weight trains
            bf16 = precision.name == "bf16" or (precision.mixed and not cfg.method.trains_all_weights)
            update = {"dtype": "bfloat16" if bf16 else "float32"}
            if precision.name != "fp32" and cfg.model.compute_dtype == "auto":
                update["compute_dtype"] = "bfloat16"
            model_cfg = cfg.model.model_copy(update=update)
        self.loaded = load_model(model_cfg, task=data.task, num_labels=len(id2label) if id2label else None,
                                 id2label=id2label)
        model, tokenizer, self.device = self.loaded.model, self.loaded.tokenizer, self.loaded.device
        self.train_set, self.eval_set, report = tokenize_run_data(cfg, data, tokenizer)
        self.method = build_method(cfg.method)
        self.method.attach(model)
        params = trainable_parameters(model)
        if not params:
            raise DeltatuneError(f"method {cfg.method.name!r} left nothing to train on this model")
        if precision.mixed:  # frozen weights in bf16, trained ones float32 masters
            store_frozen_in_bfloat16(model)
            keep_masters_in_float32(params)
        say(summarize_parameters(model, params, self.method))
        say(prepare_for_training(model, cfg.train))
        say(f"data: {report.summary()}; eval {len(self.eval_set)} examples")
        t = cfg.train
        self.objective = objective_of(t)
        self.shape = shape = run_shape(cfg, task=data.task, examples=len(self.train_set), world=ctx.world,
                                       pairs=data.pairs)
        if (shape.mode == "pack" and data.task == "causal_lm" and t.packed_attention and self.method.packed_attention
                and enable_packed_attention(model)):
            say("attention: packed rows attend per example (no block mask)")
        if data.task == "causal_lm" and t.fused_modules and use_fused_modules(model):
            say("fused RMSNorm/SwiGLU: norms and feed-forwards keep fewer activations for backward (same math)")
        self.lengths = [len(ex.input_ids) for ex in self.train_set]
        waste = padding_waste(self.lengths, plan_batches(self.lengths, batch_size=t.batch_size, mode=shape.mode,
                                                         seed=t.seed, epoch=0), shape.mode)
        ranks = f" x {ctx.world} ranks = {t.batch_size * shape.micro_per_step}" if ctx.enabled else ""
        say(f"batching: {shape.mode}, padding waste {waste:.1%}; {shape.total_steps} steps of {t.batch_size} x "
            f"{t.grad_accum}{ranks} examples ({shape.steps_per_epoch} steps per epoch)")
        self.pad_id = tokenizer.pad_token_id or 0
        self.reference: Reference | None = None
        if self.objective is not None and self.objective.needs_reference:  # before a checkpoint's weights load
            with self.autocast():
                self.reference = prepare_reference(
                    self.method, model, {"train": self.train_set, "eval": self.eval_set},  # type: ignore[dict-item]
                    out=self.out if ctx.is_main else None, precompute=t.precompute_ref, t=t,
                    block_mask=not packed_attention_enabled(model), device=self.device, say=say)
        self.result = TrainResult(output_dir=self.out, steps=self.state.step, train_loss=None)
        self.result.trainable_params = sum(p.numel() for p in params.values())
        self.result.total_params = sum(p.numel() for p in model.parameters())
        if self.last_ckpt is not None:
            load_trainable(self.last_ckpt, params)
        self.model = self.inner = model
        if ctx.enabled:
            say(f"distributed: {ctx.kind} on {ctx.world} ranks ({ctx.backend})")
            probe = self.train_set[0]
            self.model = wrap_model(model, ctx, lambda m: probe_loss(m, self.method, probe, shape.mode, self.pad_id,
                                                                     data.task, self.device, pairs=data.pairs))
            self.inner = unwrap(self.model)
            params = trainable_parameters(self.inner)  # FSDP replaced them by sharded ones
            torch.manual_seed(t.seed + ctx.rank)  # each rank its own dropout stream
        self.params = params

    def _prepare_optimizer(self) -> None:
        """Learning rates, optimizer and schedule; with a checkpoint, their state and the RNG restored."""
        cfg, t, inner, say = self.cfg, self.cfg.train, self.inner, self.say
        lr, head_lr = peak_learning_rates(t, cfg.method, self.task)
        lr_of = {f"{head}.{n}": head_lr for head in head_names(inner)
                 for n, _ in inner.get_submodule(head).named_parameters()}
        lr_of.update(self.method.learning_rates(inner, lr))
        say(f"learning rate {lr:g}{'' if t.lr else f' ({cfg.method.name} default; set train.lr to change)'}"
            + (f", classifier head {head_lr:g}" if head_names(inner) else ""))
        total = self.shape.total_steps
        switches = self.method.rate_switches(inner, lr, total)
        for text in sorted({f"from step {sw.at_step + 1} on, {cfg.method.name} trains {n.rsplit('.', 1)[-1]} at "
                            f"{sw.rate:g}" for n, sw in switches.items()}):
            say(text)
        self.optimizer = build_optimizer(self.params, t, lr, lr_of, switches)
        self.main_group = next((i for i, g in enumerate(self.optimizer.param_groups) if g["lr"] == lr), 0)
        self.scheduler = build_scheduler(self.optimizer, t, total)
        if self.last_ckpt is not None:
            extra = load_extra(self.last_ckpt)
            load_optimizer_state(self.model, self.optimizer, extra["optimizer"], self.ctx)
            self.scheduler.load_state_dict(extra["scheduler"])
            torch.set_rng_state(extra["rng_per_rank"][self.ctx.rank] if "rng_per_rank" in extra else extra["rng"])
            self.method.after_step(inner, self.state.step - 1, total)  # restore step-dependent state (a fixed mask)
            say(f"resumed from {self.last_ckpt} (step {self.state.step})")
        self.callbacks = CallbackList(default_callbacks(cfg, self.out, self.progress, self.extra_callbacks,
                                                        self.is_main))
        self.last_loss: float | None = None

    def _start_figures(self) -> None:
        """Evaluate before training (or, after a resume, read what was measured then from metrics.jsonl)."""
        result = self.result
        if self.resumed:
            for record in read_metrics(self.out / METRICS_FILE):
                if record.get("step") == 0:
                    result.eval_start.update({k: v for k, v in record.items() if k.startswith("eval_")})
                    if "exact_match" in record:
                        result.generation_start = {"exact_match": record["exact_match"], "n": record["exact_match_n"]}
                    if "tool_call_accuracy" in record:
                        result.generation_start = {k.removeprefix("tool_call_") if k == "tool_call_n" else k: v
                                                   for k, v in record.items() if k.startswith("tool_call_")}
        if self.state.step == 0:
            result.eval_start = self.evaluate(announce="eval at start")
            result.generation_start = self._generations("before training")

    def _generations(self, when: str) -> dict[str, Any]:
        t = self.cfg.train
        if not t.eval_generations or self.task != "causal_lm" or not self.data.eval or self.data.pairs:
            return {}
        if has_tool_calls(self.data.eval):
            return self._tool_calls(when)
        result = exact_match(self.inner, self.loaded.tokenizer, self.data.eval, limit=t.eval_generations)
        self.callbacks.on_eval(self, {"step": self.state.step, "exact_match": result["exact_match"],
                                      "exact_match_n": result["n"]})
        self.say(f"exact match {when}: {result['exact_match']:.1%} of {result['n']} held-out examples")
        for sample in result["samples"][:2]:
            self.say(f"  {sample['prompt']!r} -> {sample['reply']!r} (want {sample['reference']!r})")
        return result

    def _tool_calls(self, when: str) -> dict[str, Any]:
        """Tool-call accuracy and parse rate on the held-out conversations (``train.eval_generations`` call turns)."""
        result = tool_call_accuracy(self.inner, self.loaded.tokenizer, self.data.eval,
                                    limit=self.cfg.train.eval_generations)
        figures = {k: result[k] for k in ("tool_call_accuracy", "tool_call_parse_rate", "tool_call_false_calls")
                   if k in result}
        self.callbacks.on_eval(self, {"step": self.state.step, **figures, "tool_call_n": result["n"]})
        def pct(key: str) -> str:
            value = result.get(key, float("nan"))
            return "n/a" if value != value else f"{value:.1%}"  # nan: nothing to take a share of

        self.say(f"tool calls {when}: accuracy {pct('tool_call_accuracy')} of {result['n']} held-out call turns, "
                 f"parse rate {pct('tool_call_parse_rate')} of the calls it made, calls where the reference "
                 f"answers in text {pct('tool_call_false_calls')}")
        return result
