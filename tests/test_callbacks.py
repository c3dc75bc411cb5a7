"""Training callbacks: the events a run sends, in order; stopping from a callback; the one step-count rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import deltatune as dt
from deltatune.training.shape import batching_mode, run_shape
from tests.test_train import write_chat_data


class Recorder(dt.Callback):
    """Writes down every event with what it carried."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_train_start(self, run: Any) -> None:
        self.events.append(("start", run.state.step))

    def on_step_end(self, run: Any, metrics: dict[str, Any]) -> None:
        self.events.append(("step", metrics["step"]))

    def on_eval(self, run: Any, metrics: dict[str, Any]) -> None:
        self.events.append(("eval", metrics["step"]))

    def on_save(self, run: Any, path: Path) -> None:
        self.events.append(("save", path.name))

    def on_fit_end(self, run: Any) -> None:
        self.events.append(("fit_end", run.state.step))

    def on_train_end(self, run: Any, result: Any) -> None:
        self.events.append(("end", None if result is None else result.steps))


def config(tiny_llama_dir: Path, tmp_path: Path, *extra: str) -> dt.RunConfig:
    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    return dt.load_config(None, [f"model.name={tiny_llama_dir}", f"data.train={data}", "data.eval=0.25",
                                 "method.r=4", f"output.dir={tmp_path / 'run'}", "train.batch_size=4", *extra])


def test_a_run_sends_each_event_in_order(tiny_llama_dir: Path, tmp_path: Path) -> None:
    recorder = Recorder()
    cfg = config(tiny_llama_dir, tmp_path, "train.max_steps=4", "train.eval_every=2", "train.save_every=3")
    result = dt.train(cfg, progress=False, callbacks=[recorder])
    assert recorder.events == [
        ("eval", 0), ("start", 0), ("step", 1), ("step", 2), ("eval", 2), ("step", 3), ("save", "step-000003"),
        ("step", 4), ("fit_end", 4), ("save", "step-000004"), ("eval", 4), ("save", "run"), ("end", 4)]
    # the caller's callbacks see a step before the built-in actions (evaluation, checkpoint) act on it
    assert result.steps == 4
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]  # the metrics file is a callback too
    assert [r["step"] for r in logged if "eval_loss" in r] == [0, 2, 4]


def test_a_callback_can_stop_the_run_and_it_still_saves(tiny_llama_dir: Path, tmp_path: Path) -> None:
    class StopAfter2(dt.Callback):
        def on_step_end(self, run: Any, metrics: dict[str, Any]) -> None:
            if metrics["step"] == 2:
                run.request_stop()

    recorder = Recorder()
    result = dt.train(config(tiny_llama_dir, tmp_path, "train.max_steps=6"), progress=False,
                      callbacks=[StopAfter2(), recorder])
    assert result.steps == 2 and ("step", 3) not in recorder.events
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_an_interrupted_run_ends_its_callbacks_with_no_result(tiny_llama_dir: Path, tmp_path: Path) -> None:
    class CtrlC(dt.Callback):
        def on_step_end(self, run: Any, metrics: dict[str, Any]) -> None:
            raise KeyboardInterrupt

    recorder = Recorder()
    with pytest.raises(dt.DeltatuneError, match="interrupted at step 1; checkpoint written"):
        dt.train(config(tiny_llama_dir, tmp_path, "train.max_steps=6"), progress=False, callbacks=[CtrlC(), recorder])
    assert recorder.events[-3:] == [("fit_end", 1), ("save", "step-000001"), ("end", None)]


def test_the_step_count_rule_takes_accumulation_ranks_and_epochs() -> None:
    cfg = dt.load_config(None, ["data.train=x.jsonl", "train.batch_size=4", "train.grad_accum=2", "train.epochs=3"])
    shape = run_shape(cfg, task="causal_lm", examples=50, world=2)
    assert (shape.micro_per_step, shape.steps_per_epoch, shape.total_steps) == (4, 4, 12)  # 13 micro-batches
    assert run_shape(cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 5})}),
                     task="causal_lm", examples=50).total_steps == 5
    assert batching_mode(cfg.data, "causal_lm") == "pack" and batching_mode(cfg.data, "classification") == "bucket"

