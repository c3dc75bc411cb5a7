"""Experiment tracking (train.report_to): TensorBoard's event files read back with TensorBoard's own reader,
MLflow's runs queried with MLflow's client on a local store, a missing extra as one clear line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import deltatune as dt
from deltatune.cli import main
from tests.test_train import write_chat_data


def config(tiny_llama_dir: Path, tmp_path: Path, report_to: str, *extra: str) -> dt.RunConfig:
    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    return dt.load_config(None, [f"model.name={tiny_llama_dir}", f"data.train={data}", "data.eval=0.25",
                                 "method.r=4", f"output.dir={tmp_path / 'run'}", "train.batch_size=4",
                                 "train.max_steps=4", "train.eval_every=2", f"train.report_to={report_to}", *extra])


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_gets_every_figure_of_metrics_jsonl_and_the_config(tiny_llama_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = dt.train(config(tiny_llama_dir, tmp_path, "tensorboard"), progress=False)
    events = EventAccumulator(str(result.output_dir / "tensorboard"))
    events.Reload()
    steps = [r for r in logged(result.output_dir) if "loss" in r]
    evals = [r for r in logged(result.output_dir) if "eval_loss" in r]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/loss")] == [r["step"] for r in evals] == [0, 2, 4]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "eval/ppl"} <= set(events.Tags()["scalars"])
    assert "config/text_summary" in events.Tags()["tensors"]


def test_mlflow_logs_params_metrics_and_the_delta_to_a_local_store(tiny_llama_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the default store: ./mlruns
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = dt.train(config(tiny_llama_dir, tmp_path, "mlflow"), progress=False)
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("deltatune")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "lora" and run.data.params["train.max_steps"] == "4"
    history = client.get_metric_history(run.info.run_id, "loss")
    steps = [r for r in logged(result.output_dir) if "loss" in r]
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3, 4]
    assert sorted(m.value for m in history) == pytest.approx(sorted(r["loss"] for r in steps), rel=1e-6)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [0, 2, 4]
    artifacts = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "delta")}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= artifacts


def test_a_missing_tracker_is_one_line_naming_the_extra(tiny_llama_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    data = write_chat_data(tmp_path / "d.jsonl", n=8)
    code = main(["train", f"model.name={tiny_llama_dir}", f"data.train={data}", f"output.dir={tmp_path / 'run'}",
                 "train.report_to=mlflow", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["deltatune: train.report_to: mlflow is not installed; pip install "
                                 "'deltatune[track]' (or report_to=none)"]
    assert not (tmp_path / "run").exists()  # stopped before any work
    with pytest.raises(dt.ConfigError, match="none"):
        dt.load_config(None, ["train.report_to=[none, mlflow]"])
    assert dt.load_config(None, ["train.report_to=none"]).train.report_to == []


def test_compare_logs_each_method_as_a_child_of_one_parent_run(tiny_llama_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from tests.test_compare import llama_file

    store = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    run_yaml = llama_file(tmp_path, tiny_llama_dir, methods=["lora", "ia3"])
    text = run_yaml.read_text().replace("train:\n", "train:\n  report_to: [mlflow]\n", 1)
    run_yaml.write_text(text.replace("eval_generations: 4", "eval_generations: 0"))
    assert main(["compare", str(run_yaml)]) == 0
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("deltatune").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == {"lora", "ia3"}
    assert all(client.get_metric_history(r.info.run_id, "eval_loss") for r in children.values())
