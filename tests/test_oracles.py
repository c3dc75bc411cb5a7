"""deltatune's losses against an outside oracle: transformers' own ``model(..., labels=...).loss`` on unpacked
examples of the real data (../shared/data), for a causal LM and a classifier. The oracle is shown to be sharp:
the same labels shifted by one position give a clearly different loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import deltatune as dt
from deltatune.data import load_examples, tokenize_examples
from deltatune.evaluate import eval_loss
from tests.conftest import shared_data


def hf_causal_loss(model: torch.nn.Module, examples: list[Any], shift: int = 0) -> float:
    """Token-mean loss over ``examples`` from transformers' own loss, one unpadded example at a time (its mean
    over the example's supervised next tokens, weighted by their count). ``shift`` moves the labels."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            labels = torch.tensor(ex.labels)
            if shift:
                labels = torch.roll(labels, shift)
            n = int((labels[1:] != -100).sum())
            if n == 0:
                continue
            loss = model(input_ids=torch.tensor([ex.input_ids]), labels=labels[None]).loss
            total, count = total + float(loss) * n, count + n
    return total / count


@pytest.fixture(scope="module")
def alpaca(tiny_llama_dir: Path) -> tuple[Any, list[Any]]:
    loaded = dt.load_model(dt.ModelConfig(name=str(tiny_llama_dir), device="cpu"))
    examples, _ = tokenize_examples(load_examples(str(shared_data("alpaca_en_demo.json")))[:12], loaded.tokenizer,
                                    task="causal_lm", max_length=512, truncation="drop")
    return loaded, examples


@pytest.mark.parametrize("chunked", [True, False])
def test_causal_eval_loss_equals_transformers_own_loss(alpaca: tuple[Any, list[Any]], chunked: bool) -> None:
    loaded, examples = alpaca
    ours = eval_loss(loaded.model, examples, task="causal_lm", batch_size=4, mode="pad",
                     pad_id=loaded.tokenizer.pad_token_id or 0, device=torch.device("cpu"), chunked=chunked)
    oracle = hf_causal_loss(loaded.model, examples)
    assert ours["eval_loss"] == pytest.approx(oracle, rel=1e-5)
    off_by_one = hf_causal_loss(loaded.model, examples, shift=1)
    assert abs(off_by_one - oracle) > 1e-3 * oracle  # the oracle would see a label-shift bug


def test_the_first_training_loss_equals_transformers_own_loss(alpaca: tuple[Any, list[Any]], tiny_llama_dir: Path,
                                                             tmp_path: Path) -> None:
    """Step 1's reported loss is computed before any update, with LoRA's B = 0: the base model's loss on the step's
    examples, unpacked (data.batching=pad), token-weighted over the step."""
    loaded, _ = alpaca

    class FirstStep(dt.Callback):
        def __init__(self) -> None:
            self.examples: list[Any] = []
            self.loss = float("nan")

        def on_step_end(self, run: Any, metrics: dict[str, Any]) -> None:
            if metrics["step"] == 1:
                self.examples = [run.train_set[i] for i in run.step_examples]
                self.loss = metrics["loss"]

    cfg = dt.load_config(None, [f"model.name={tiny_llama_dir}", f"data.train={shared_data('alpaca_en_demo.json')}",
                                "data.eval=null", "data.batching=pad", "train.batch_size=4", "train.max_steps=1",
                                "method.r=4", f"output.dir={tmp_path / 'run'}"])
    first = FirstStep()
    dt.train(cfg, progress=False, callbacks=[first])
    assert len(first.examples) == 4
    assert first.loss == pytest.approx(hf_causal_loss(loaded.model, first.examples), rel=1e-5)


def test_classifier_eval_loss_equals_transformers_own_loss(tiny_bert_dir: Path) -> None:
    loaded = dt.load_model(dt.ModelConfig(name=str(tiny_bert_dir), device="cpu"), task="classification",
                           num_labels=2, id2label={0: "0", 1: "1"})
    examples, _ = tokenize_examples(load_examples(str(shared_data("sst2_dev.tsv")))[:16], loaded.tokenizer,
                                    task="classification", max_length=128, truncation="drop",
                                    label2id={"0": 0, "1": 1})
    ours = eval_loss(loaded.model, examples, task="classification", batch_size=4, mode="bucket",
                     pad_id=loaded.tokenizer.pad_token_id or 0, device=torch.device("cpu"))
    with torch.no_grad():
        oracle = sum(float(loaded.model(input_ids=torch.tensor([ex.input_ids]),
                                        labels=torch.tensor([ex.label])).loss) for ex in examples) / len(examples)
    assert ours["eval_loss"] == pytest.approx(oracle, rel=1e-5)
    assert {ex.label for ex in examples} == {0, 1}  # both classes present: a label mix-up would show


@pytest.mark.slow
def test_packing_padding_and_bucketing_train_the_same_delta(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The same examples in every step (one batch holds them all), three batchings: the same per-step losses and
    the same delta, to float tolerance. Packing's per-example attention and padding's masks are the same math."""
    import json

    from safetensors.torch import load_file

    alpaca = json.loads(shared_data("alpaca_en_demo.json").read_text())[:8]
    data = tmp_path / "a.json"
    data.write_text(json.dumps(alpaca))
    runs = {}
    for mode in ("pack", "pad", "bucket"):
        out = tmp_path / mode
        cfg = dt.load_config(None, [f"model.name={tiny_llama_dir}", f"data.train={data}", "data.eval=null",
                                    f"data.batching={mode}", "train.batch_size=8", "train.max_steps=3",
                                    "train.lr=1e-2", "method.r=4", f"output.dir={out}"])
        dt.train(cfg, progress=False)
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
        runs[mode] = (losses, load_file(out / "adapter_model.safetensors"))
    pack_losses, pack_delta = runs["pack"]
    for mode in ("pad", "bucket"):
        losses, delta = runs[mode]
        assert losses == pytest.approx(pack_losses, rel=1e-5), mode
        assert delta.keys() == pack_delta.keys()
        for key in delta:
            torch.testing.assert_close(delta[key], pack_delta[key], atol=2e-5, rtol=1e-4, msg=f"{mode}: {key}")
    assert any(float(v.abs().max()) > 1e-3 for k, v in pack_delta.items() if "lora_B" in k)  # it did train
