"""Callbacks: what happens around the training loop, each thing in its own small class.

    class StopAt(Callback):
        def on_step_end(self, run, metrics):
            if metrics["step"] == 5:
                run.request_stop()

    train(cfg, callbacks=[StopAt()])

The loop (``loop.Recipe``) calls, in order: ``on_train_start`` once before the first step; ``on_step_end`` after
every optimizer step with that step's figures (step, epoch, loss, lr, grad_norm, tokens, tokens_per_s);
``on_eval`` with every evaluation's figures (at the start, periodically, at the end; ``step`` included);
``on_save`` with the folder of every checkpoint and of the final delta; ``on_fit_end`` when the step loop is
over; ``on_train_end`` last, with the TrainResult, or None when the run was interrupted. Under torchrun every rank
calls every callback (periodic evaluation and checkpoints are collective); ``run.is_main`` tells rank 0.

The progress bar, ``metrics.jsonl``, periodic evaluation, periodic checkpoints and the time budget are the
built-in callbacks below; ``default_callbacks`` puts them together with the caller's for a run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltatune.training.progress import MetricsLog, Progress

if TYPE_CHECKING:
    from deltatune.config import RunConfig
    from deltatune.training.loop import Recipe
    from deltatune.training.result import TrainResult


class Callback:
    """A hook into training; every method does nothing unless overridden."""

    def on_train_start(self, run: Recipe) -> None:
        """Called once, after setup and the first evaluation, before the first step."""

    def on_step_end(self, run: Recipe, metrics: dict[str, Any]) -> None:
        """Called after every optimizer step with its figures."""

    def on_eval(self, run: Recipe, metrics: dict[str, Any]) -> None:
        """Called with the figures of every evaluation (``step`` included)."""

    def on_save(self, run: Recipe, path: Path) -> None:
        """Called with the folder of each checkpoint and of the final delta, once written."""

    def on_fit_end(self, run: Recipe) -> None:
        """Called when the step loop is over (done, out of time, or interrupted)."""

    def on_train_end(self, run: Recipe, result: TrainResult | None) -> None:
        """Called last, with the result (None when the run was interrupted)."""


def logged_step(run: Recipe, step: int) -> bool:
    """Whether ``step``'s figures are logged (metrics.jsonl, the trackers): every ``train.log_every`` steps and
    the last."""
    return step % run.cfg.train.log_every == 0 or step == run.shape.total_steps


class CallbackList(Callback):
    """Calls each callback in turn."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = callbacks

    def on_train_start(self, run: Recipe) -> None:
        """Fan out ``on_train_start``."""
        for c in self.callbacks:
            c.on_train_start(run)

    def on_step_end(self, run: Recipe, metrics: dict[str, Any]) -> None:
        """Fan out ``on_step_end``."""
        for c in self.callbacks:
            c.on_step_end(run, metrics)

    def on_eval(self, run: Recipe, metrics: dict[str, Any]) -> None:
        """Fan out ``on_eval``."""
        for c in self.callbacks:
            c.on_eval(run, metrics)

    def on_save(self, run: Recipe, path: Path) -> None:
        """Fan out ``on_save``."""
        for c in self.callbacks:
            c.on_save(run, path)

    def on_fit_end(self, run: Recipe) -> None:
        """Fan out ``on_fit_end``."""
        for c in self.callbacks:
            c.on_fit_end(run)

    def on_train_end(self, run: Recipe, result: TrainResult | None) -> None:
        """Fan out ``on_train_end``."""
        for c in self.callbacks:
            c.on_train_end(run, result)


class ProgressBar(Callback):
    """The tqdm bar on stderr (rank 0): step, loss, tokens/s, learning rate; periodic evaluations above it."""

    def __init__(self) -> None:
        self.bar: Progress | None = None

    def on_train_start(self, run: Recipe) -> None:
        """Open the bar at the run's step (after a resume, where it stopped)."""
        self.bar = Progress(run.shape.total_steps, run.state.step, enabled=run.is_main)

    def on_step_end(self, run: Recipe, metrics: dict[str, Any]) -> None:
        """Advance one step."""
        if self.bar is not None:
            self.bar.update(metrics["loss"], metrics["lr"], metrics["step_tokens"])

    def on_eval(self, run: Recipe, metrics: dict[str, Any]) -> None:
        """Print a periodic evaluation above the bar (the first and last are printed by the loop)."""
        if self.bar is not None and run.is_main and "eval_loss" in metrics:
            self.bar.write(f"step {metrics['step']}: " + format_figures(metrics))

    def on_fit_end(self, run: Recipe) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsFile(Callback):
    """``metrics.jsonl`` in the output folder (rank 0): every ``log_every`` steps and the last, and every
    evaluation. On resume, lines logged after the checkpoint are dropped (they are logged again)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.log: MetricsLog | None = None

    def on_train_start(self, run: Recipe) -> None:
        """Open the file (rank 0)."""
        self._open(run)

    def _open(self, run: Recipe) -> MetricsLog:
        if self.log is None:
            self.log = MetricsLog(self.path, keep_until_step=run.state.step if run.resumed else None,
                                  enabled=run.is_main)
        return self.log

    def on_step_end(self, run: Recipe, metrics: dict[str, Any]) -> None:
        """Write the step's figures on the logged steps (:func:`logged_step`)."""
        if logged_step(run, metrics["step"]):
            self._open(run).write({k: v for k, v in metrics.items() if k != "step_tokens"})

    def on_eval(self, run: Recipe, metrics: dict[str, Any]) -> None:
        """Write the evaluation's figures (also before the first step: the file opens then)."""
        self._open(run).write(metrics)

    def on_train_end(self, run: Recipe, result: TrainResult | None) -> None:
        """Close the file."""
        if self.log is not None:
            self.log.close()


class Periodic(Callback):
    """Acts every ``every`` steps, but not at the last (the run's own final evaluation and checkpoint follow)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_step_end(self, run: Recipe, metrics: dict[str, Any]) -> None:
        """Act when the step is a multiple of ``every``."""
        step = metrics["step"]
        if step % self.every == 0 and step < run.shape.total_steps:
            self.act(run)

    def act(self, run: Recipe) -> None:
        """What to do on those steps."""
        raise NotImplementedError


class PeriodicEval(Periodic):
    """Evaluate every ``train.eval_every`` steps."""

    def act(self, run: Recipe) -> None:
        """Evaluate."""
        run.evaluate()


class PeriodicCheckpoint(Periodic):
    """Write a checkpoint every ``train.save_every`` steps."""

    def act(self, run: Recipe) -> None:
        """Checkpoint."""
        run.checkpoint()


class TimeBudget(Callback):
    """``train.max_seconds``: stop after the step that used up the budget (wall time of the step loop)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = 0.0
        self.used_up = False

    def on_train_start(self, run: Recipe) -> None:
        """Start the clock."""
        self.started = time.perf_counter()

    def on_step_end(self, run: Recipe, metrics: dict[str, Any]) -> None:
        """Ask the loop to stop once the budget is spent."""
        if time.perf_counter() - self.started >= self.seconds:
            self.used_up = True
            run.request_stop()

    def on_fit_end(self, run: Recipe) -> None:
        """Say that the budget stopped the run early."""
        if self.used_up and run.state.step < run.shape.total_steps:
            run.say(f"time budget train.max_seconds={self.seconds:g} used up: stopped after step {run.state.step} "
                    f"of {run.shape.total_steps}")


def default_callbacks(cfg: RunConfig, out: Path, progress: bool, extra: list[Callback] | None = None,
                      is_main: bool = True) -> list[Callback]:
    """Return the callbacks of a run of ``cfg`` writing to ``out``: the built-in observers (metrics.jsonl, the
    bar, the trackers of ``train.report_to`` on rank 0), then ``extra`` (the caller's), then the built-in
    actions (periodic evaluation and checkpoints, the time budget), so that the caller's callbacks see each step
    before anything acts on it."""
    from deltatune.training.setup import METRICS_FILE
    from deltatune.training.tracking import tracker_callbacks

    t = cfg.train
    callbacks: list[Callback] = [MetricsFile(out / METRICS_FILE)]
    if progress:
        callbacks.append(ProgressBar())
    callbacks += tracker_callbacks(cfg, out, is_main)
    callbacks += extra or []
    if t.eval_every:
        callbacks.append(PeriodicEval(t.eval_every))
    if t.save_every:
        callbacks.append(PeriodicCheckpoint(t.save_every))
    if t.max_seconds:
        callbacks.append(TimeBudget(t.max_seconds))
    return callbacks


def format_figures(figures: dict[str, Any]) -> str:
    """``loss 1.2345, ppl 3.4361`` from eval figures (``eval_`` prefixes dropped, non-eval keys left out)."""
    return ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in figures.items() if k.startswith("eval_"))
