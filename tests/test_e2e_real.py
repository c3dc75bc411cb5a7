"""End to end on the bundled real models and the reference data (slow: `make test-fast` skips them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.cli import main

from .conftest import shared_data

pytestmark = pytest.mark.slow


def _evals(out: Path, key: str) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines if key in json.loads(line)]


def test_lora_on_smollm2_lowers_alpaca_eval_loss(smollm2_dir: Path, tmp_path: Path) -> None:
    data = shared_data("alpaca_en_demo.json")
    out = tmp_path / "run"
    assert main(["train", f"data.train={data}", "data.max_examples=120", "data.eval=0.15", "data.max_length=256",
                 "method.r=16", "method.alpha=32", "train.max_steps=12", "train.batch_size=4", "train.lr=5e-4",
                 f"output.dir={out}", "--no-progress"]) == 0
    evals = _evals(out, "eval_loss")
    assert evals[-1] < evals[0] - 0.02, evals
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(smollm2_dir)


def test_lora_on_minilm_learns_sst2(tmp_path: Path) -> None:
    train, dev = shared_data("sst2_train_20k.tsv"), shared_data("sst2_dev.tsv")
    out = tmp_path / "run"
    assert main(["train", "model.name=minilm", f"data.train={train}", f"data.eval={dev}", "data.max_examples=1600",
                 "method.r=8", "train.batch_size=32", "train.epochs=1", "train.lr=1e-3", f"output.dir={out}",
                 "--no-progress"]) == 0
    accuracy = _evals(out, "eval_accuracy")
    assert accuracy[-1] > 0.75 and accuracy[-1] > accuracy[0] + 0.15, accuracy
