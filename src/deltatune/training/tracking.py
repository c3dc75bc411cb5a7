"""Experiment tracking: TensorBoard and MLflow, as training callbacks (``train.report_to``).

    train.report_to: [tensorboard, mlflow]

Each tracker gets every figure that goes to ``metrics.jsonl`` (loss, learning rate, gradient norm, tokens/s at
each logged step; every evaluation's figures) and the resolved config; MLflow also gets the final delta as an
artifact. TensorBoard writes event files to ``<output.dir>/tensorboard``. MLflow logs to
``MLFLOW_TRACKING_URI``, else to a local file store ``./mlruns`` (see :func:`tracking_uri`), in the experiment
``MLFLOW_EXPERIMENT_NAME`` (default ``deltatune``); a run whose environment names a parent run
(``DELTATUNE_MLFLOW_PARENT_RUN``, set by ``deltatune compare``) is logged as its child. Under torchrun only
rank 0 logs. Both are optional extras: ``pip install 'deltatune[track]'``.
MLflow is driven through ``MlflowClient`` (no process-wide active run is left behind in the caller's process).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltatune.errors import DeltatuneError
from deltatune.training.callbacks import Callback, logged_step

if TYPE_CHECKING:
    from deltatune.config import RunConfig
    from deltatune.training.loop import Recipe
    from deltatune.training.result import TrainResult

EXTRA = "pip install 'deltatune[track]'"
PARENT_RUN_ENV = "DELTATUNE_MLFLOW_PARENT_RUN"
STEP_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s")
DELTA_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md", "run.yaml")


def flat_config(cfg: RunConfig) -> dict[str, str | int | float | bool]:
    """The resolved config as ``{"train.lr": 0.0002, ...}`` (lists and None as text)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value if isinstance(value, (int, float, bool, str)) else str(value)

    walk("", cfg.model_dump(mode="json"))
    return flat


def tracker_callbacks(cfg: RunConfig, out: Path, is_main: bool) -> list[Callback]:
    """Return the trackers ``cfg.train.report_to`` names (none on ranks other than 0); raise DeltatuneError naming
    the extra when one is not installed."""
    if not is_main:
        return []
    made: list[Callback] = []
    for name in cfg.train.report_to:
        made.append(TensorBoardTracker(out / "tensorboard", cfg) if name == "tensorboard" else MLflowTracker(out, cfg))
    return made


def check_trackers(names: list[str]) -> None:
    """Raise DeltatuneError when a tracker in ``names`` cannot be imported (before any training work)."""
    for name in names:
        module = {"tensorboard": "tensorboard", "mlflow": "mlflow"}[name]
        try:
            __import__(module)
        except ImportError:
            raise DeltatuneError(f"train.report_to: {name} is not installed; {EXTRA} (or report_to=none)") from None


@contextlib.contextmanager
def parent_run(name: str, tags: dict[str, str]) -> Iterator[str]:
    """An MLflow parent run for the block (``deltatune compare``): its id is put in ``$DELTATUNE_MLFLOW_PARENT_RUN``
    so that runs started meanwhile (the compared methods, in their own processes) are logged as its children.
    Ends FINISHED, or KILLED when the block raises."""
    from mlflow.tracking import MlflowClient

    check_trackers(["mlflow"])
    client = MlflowClient(tracking_uri=tracking_uri())
    run_id = client.create_run(_experiment_id(client), run_name=name, tags=tags).info.run_id
    before = os.environ.get(PARENT_RUN_ENV)
    os.environ[PARENT_RUN_ENV] = run_id
    status = "KILLED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        if before is None:
            os.environ.pop(PARENT_RUN_ENV, None)
        else:
            os.environ[PARENT_RUN_ENV] = before
        client.set_terminated(run_id, status)


def _experiment_id(client: Any) -> str:
    """The id of the experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``deltatune``), created when missing."""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "deltatune")
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


class TensorBoardTracker(Callback):
    """Scalars ``train/<figure>`` and ``eval/<figure>`` by step, the config as text and as hyper-parameters."""

    def __init__(self, folder: Path, cfg: RunConfig) -> None:
        self.folder, self.cfg = folder, cfg
        self.writer: Any = None

    def on_train_start(self, run: Recipe) -> None:
        """Open the event file and write the config."""
        self._open()

    def _open(self) -> Any:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            from deltatune.config import dump_config

            self.writer = SummaryWriter(log_dir=str(self.folder))
            self.writer.add_text("config", "```yaml\n" + dump_config(self.cfg) + "```", 0)
        return self.writer

    def on_step_end(self, run: Recipe, metrics: dict[str, Any]) -> None:
        """Log the step's figures (on the steps metrics.jsonl logs)."""
        step = metrics["step"]
        if logged_step(run, step):
            for key in STEP_KEYS:
                if isinstance(metrics.get(key), (int, float)):
                    self._open().add_scalar(f"train/{key}", metrics[key], step)

    def on_eval(self, run: Recipe, metrics: dict[str, Any]) -> None:
        """Log an evaluation's figures."""
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)):
                self._open().add_scalar(f"eval/{key.removeprefix('eval_')}", value, metrics["step"])

    def on_train_end(self, run: Recipe, result: TrainResult | None) -> None:
        """Write the hyper-parameters with the final figures, and close the file."""
        if self.writer is None:
            return
        if result is not None:
            from torch.utils.tensorboard.summary import hparams

            final = {f"final/{k.removeprefix('eval_')}": v for k, v in result.eval_end.items()}
            for summary in hparams(flat_config(self.cfg), final):
                self.writer.file_writer.add_summary(summary)
            for key, value in final.items():
                self.writer.add_scalar(key, value, result.steps)
        self.writer.close()


class MLflowTracker(Callback):
    """One MLflow run per training run: params (the config), metrics by step, the delta as artifacts."""

    def __init__(self, out: Path, cfg: RunConfig) -> None:
        self.out, self.cfg = out, cfg
        self.client: Any = None
        self.run_id: str | None = None

    def on_train_start(self, run: Recipe) -> None:
        """Create the run (a child of ``$DELTATUNE_MLFLOW_PARENT_RUN`` when set) and log the config."""
        self._open()

    def _open(self) -> str:
        if self.run_id is not None:
            return self.run_id
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri())
        experiment_id = _experiment_id(self.client)
        tags = {"deltatune.output_dir": str(self.out), "deltatune.method": self.cfg.method.name}
        parent = os.environ.get(PARENT_RUN_ENV)
        if parent:
            tags["mlflow.parentRunId"] = parent
        created = self.client.create_run(experiment_id, run_name=self.out.name, tags=tags)
        self.run_id = created.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flat_config(self.cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        return self.run_id

    def _metrics(self, figures: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in figures.items() if isinstance(v, (int, float))]
        if batch:
            run_id = self._open()  # the first evaluation comes before on_train_start
            self.client.log_batch(run_id, metrics=batch)

    def on_step_end(self, run: Recipe, metrics: dict[str, Any]) -> None:
        """Log the step's figures (on the steps metrics.jsonl logs)."""
        step = metrics["step"]
        if logged_step(run, step):
            self._metrics({k: metrics[k] for k in STEP_KEYS if k in metrics}, step)

    def on_eval(self, run: Recipe, metrics: dict[str, Any]) -> None:
        """Log an evaluation's figures."""
        self._metrics({k: v for k, v in metrics.items() if k != "step"}, metrics["step"])

    def on_save(self, run: Recipe, path: Path) -> None:
        """Log the final delta's files as artifacts (``delta/``); checkpoints are not uploaded."""
        if path == self.out:
            run_id = self._open()
            for name in DELTA_FILES:
                if (path / name).is_file():
                    self.client.log_artifact(run_id, str(path / name), artifact_path="delta")

    def on_train_end(self, run: Recipe, result: TrainResult | None) -> None:
        """End the run: FINISHED, or KILLED when interrupted."""
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "FINISHED" if result is not None else "KILLED")


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the local store ``./mlruns`` (as a file URI).

    MLflow 3 keeps its file store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is set;
    for this default (no server, no database, nothing to install beyond mlflow-skinny) deltatune sets it. Point
    ``MLFLOW_TRACKING_URI`` at a server or ``sqlite:///mlflow.db`` (full ``mlflow``) for MLflow's recommended
    backends."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or Path("mlruns").resolve().as_uri()
    if uri.startswith("file:") or "://" not in uri:  # a local folder: MLflow's file store
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri
