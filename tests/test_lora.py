"""The Method contract for LoRA on a tiny Llama and a tiny BERT classifier, and peft compatibility."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.config import ModelConfig
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.methods import find_targets, trainable_parameters
from deltatune.methods.lora import LoraLinear, lora_layers

IDS = torch.tensor([[1, 17, 250, 3000, 42, 9, 77, 5]])


def _load(path: Path, task: str = "causal_lm") -> dt.LoadedModel:
    return dt.load_model(ModelConfig(name=str(path), device="cpu"), task=task, num_labels=3)


def _randomize_lora(model: torch.nn.Module) -> None:
    """Give B non-zero values, as training would, so merge and save tests are not trivial."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.05)


def test_attach_keeps_outputs_exactly_and_trains_only_lora(tiny_llama_dir: Path) -> None:
    loaded = _load(tiny_llama_dir)
    base = loaded.model(IDS).logits
    dt.attach(loaded.model, {"name": "lora", "r": 4})
    assert torch.equal(loaded.model(IDS).logits, base)
    names = set(trainable_parameters(loaded.model))
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    # all 7 linear layers of both blocks, never the output head
    assert len(list(lora_layers(loaded.model))) == 14
    assert not isinstance(loaded.model.lm_head, LoraLinear)


def test_merge_equals_unmerged_and_disable_equals_base(tiny_llama_dir: Path) -> None:
    loaded = _load(tiny_llama_dir)
    base = loaded.model(IDS).logits
    method = dt.attach(loaded.model, {"name": "lora", "r": 4, "alpha": 8})
    _randomize_lora(loaded.model)
    unmerged = loaded.model(IDS).logits
    assert (unmerged - base).abs().max() > 1e-3  # the update is real
    with method.disabled(loaded.model):
        assert torch.equal(loaded.model(IDS).logits, base)
    merged_model = dt.merge(loaded.model, method)
    assert not list(lora_layers(merged_model))
    assert torch.allclose(merged_model(IDS).logits, unmerged, atol=1e-4)


def test_unmerge_restores_base_weights(tiny_llama_dir: Path) -> None:
    loaded = _load(tiny_llama_dir)
    dt.attach(loaded.model, {"name": "lora", "r": 4})
    _randomize_lora(loaded.model)
    _, layer = next(lora_layers(loaded.model))
    w0 = layer.base_layer.weight.clone()
    y = loaded.model(IDS).logits
    layer.merge_()
    assert not torch.equal(layer.base_layer.weight, w0)
    assert torch.allclose(loaded.model(IDS).logits, y, atol=1e-4)
    layer.unmerge_()
    assert torch.allclose(layer.base_layer.weight, w0, atol=1e-6)


def test_rslora_scaling() -> None:
    layer = LoraLinear(torch.nn.Linear(8, 8), r=4, alpha=8, dropout=0.0, use_rslora=True)
    assert layer.scaling == pytest.approx(8 / 2)
    assert LoraLinear(torch.nn.Linear(8, 8), r=4, alpha=8, dropout=0.0, use_rslora=False).scaling == 2


def test_targets_by_name_regex_layers_and_no_match(tiny_llama_dir: Path) -> None:
    model = _load(tiny_llama_dir).model
    assert find_targets(model, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")]
    assert find_targets(model, r".*\.mlp\..*", layers=[1]) == [
        f"model.layers.1.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
    with pytest.raises(ConfigError, match="q_proj"):
        find_targets(model, ["query"])


def test_save_load_round_trip_is_bit_identical(tiny_llama_dir: Path, tmp_path: Path) -> None:
    loaded = _load(tiny_llama_dir)
    method = dt.attach(loaded.model, {"name": "lora", "r": 4, "targets": ["q_proj", "v_proj"]})
    _randomize_lora(loaded.model)
    want = loaded.model(IDS).logits
    dt.save_delta(tmp_path, method, loaded.model, loaded.source, task="causal_lm")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["base_model_name_or_path"] == str(tiny_llama_dir)
    delta = dt.load_delta(tmp_path, device="cpu")
    assert torch.equal(delta.loaded.model(IDS).logits, want)


def test_peft_loads_the_delta_unchanged(tiny_llama_dir: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    loaded = _load(tiny_llama_dir)
    method = dt.attach(loaded.model, {"name": "lora", "r": 4, "alpha": 16, "use_rslora": True})
    _randomize_lora(loaded.model)
    want = loaded.model(IDS).logits
    dt.save_delta(tmp_path, method, loaded.model, loaded.source, task="causal_lm")
    base = _load(tiny_llama_dir).model
    with _no_warnings():
        peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path))
    assert torch.allclose(peft_model(IDS).logits, want, atol=1e-5)


class _no_warnings:
    """Fail if peft warns while loading (unknown config keys, missing tensors)."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings(record=True)
        self._caught = self._ctx.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)
        relevant = [w for w in self._caught if "peft" in str(w.filename) or "adapter" in str(w.message).lower()]
        assert not relevant, [str(w.message) for w in relevant]


def test_peft_delta_loads_in_deltatune(tiny_llama_dir: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base = _load(tiny_llama_dir).model
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"],
                                                           init_lora_weights=False))
    want = peft_model(IDS).logits
    peft_model.save_pretrained(tmp_path)
    delta = dt.load_delta(tmp_path, device="cpu")
    assert torch.allclose(delta.loaded.model(IDS).logits, want, atol=1e-5)


def test_classifier_lora_trains_head_and_round_trips_with_peft(tiny_bert_dir: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    loaded = _load(tiny_bert_dir, task="classification")
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    base = loaded.model(input_ids=ids).logits
    method = dt.attach(loaded.model, {"name": "lora", "r": 2})
    assert torch.equal(loaded.model(input_ids=ids).logits, base)
    names = set(trainable_parameters(loaded.model))
    assert {"classifier.weight", "classifier.bias"} <= names
    _randomize_lora(loaded.model)
    with torch.no_grad():
        loaded.model.classifier.weight.add_(0.1)
    want = loaded.model(input_ids=ids).logits
    dt.save_delta(tmp_path, method, loaded.model, loaded.source, task="classification")
    assert torch.equal(dt.load_delta(tmp_path, device="cpu").loaded.model(input_ids=ids).logits, want)
    fresh = _load(tiny_bert_dir, task="classification").model
    peft_model = peft.PeftModel.from_pretrained(fresh, str(tmp_path))
    assert torch.allclose(peft_model(input_ids=ids).logits, want, atol=1e-5)


def test_attach_twice_and_wrong_delta_are_clear_errors(tiny_llama_dir: Path, tmp_path: Path) -> None:
    loaded = _load(tiny_llama_dir)
    method = dt.attach(loaded.model, {"name": "lora", "r": 4})
    with pytest.raises(DeltatuneError, match="already has LoRA"):
        dt.attach(loaded.model, {"name": "lora"})
    dt.save_delta(tmp_path, method, loaded.model, loaded.source, task="causal_lm")
    other = _load(tiny_llama_dir).model
    dt.attach(other, {"name": "lora", "r": 8})
    with pytest.raises(DeltatuneError, match="shape"):
        method.load_delta_state_dict(other, dict(method.delta_state_dict(loaded.model)))


def test_peft_classifier_delta_with_three_labels_loads(tiny_bert_dir: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base = _load(tiny_bert_dir, task="classification").model  # 3 labels
    peft_model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"],
                                                           init_lora_weights=False))
    peft_model.eval()
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    want = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path)
    delta = dt.load_delta(tmp_path, device="cpu")
    assert delta.loaded.model.config.num_labels == 3
    assert torch.allclose(delta.loaded.model(input_ids=ids).logits, want, atol=1e-5)
