"""Methods stacked on one model: lora + bitfit through a list of methods, and refused combinations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.config import ModelConfig, load_config
from deltatune.errors import ConfigError
from deltatune.methods import trainable_parameters
from deltatune.methods.lora import LoraLinear

IDS = torch.tensor([[1, 17, 250, 3000, 42, 9, 77, 5]])


def _perturb(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def test_lora_plus_bitfit_attach_save_load_merge(tiny_llama_dir: Path, tmp_path: Path) -> None:
    loaded = dt.load_model(ModelConfig(name=str(tiny_llama_dir), device="cpu"))
    base = loaded.model(IDS).logits
    method = dt.attach(loaded.model, {"name": "compose", "methods": [{"name": "lora", "r": 4}, {"name": "bitfit"}]})
    assert torch.equal(loaded.model(IDS).logits, base)
    names = set(trainable_parameters(loaded.model))
    assert any(n.endswith("lora_A.weight") for n in names) and any(n.endswith("base_layer.bias") for n in names)
    # bitfit never touched LoRA's own layers
    assert not any(".lora_A.bias" in n or ".lora_B.bias" in n for n, _ in loaded.model.named_parameters())
    _perturb(loaded.model)
    want = loaded.model(IDS).logits
    dt.save_delta(tmp_path, method, loaded.model, loaded.source, task="causal_lm")
    again = dt.load_delta(tmp_path, device="cpu")
    assert torch.equal(again.loaded.model(IDS).logits, want)
    merged = dt.merge(again.loaded.model, again.method)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert torch.allclose(merged(IDS).logits, want, atol=1e-4)


def test_a_yaml_list_of_methods_becomes_compose(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("method:\n  - {name: lora, r: 4}\n  - {name: bitfit}\n")
    cfg = load_config(run)
    assert cfg.method.name == "compose" and [m.name for m in cfg.method.methods] == ["lora", "bitfit"]
    assert cfg.method.methods[0].r == 4
    assert load_config(None, ["method=[{name: lora}, {name: ia3}]"]).method.name == "compose"


@pytest.mark.parametrize(("methods", "message"), [
    ("[{name: full}, {name: lora}]", "cannot be combined"),
    ("[{name: lora}, {name: lora, r: 4}]", "appears twice"),
    ("[{name: prompt_tuning}, {name: prefix_tuning}]", "two prompt methods"),
    ("[{name: lora}]", "at least two methods"),
    ("[{name: lora, rank: 3}, {name: bitfit}]", "rank"),
])
def test_refused_combinations_say_why(methods: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"method={methods}"])


def test_compose_with_a_prompt_method_cannot_merge(tiny_llama_dir: Path) -> None:
    loaded = dt.load_model(ModelConfig(name=str(tiny_llama_dir), device="cpu"))
    method = dt.attach(loaded.model, {"name": "compose", "methods": [{"name": "lora", "r": 2},
                                                                     {"name": "prompt_tuning"}]})
    with pytest.raises(dt.DeltatuneError, match="prompt_tuning cannot be merged"):
        dt.merge(loaded.model, method)
