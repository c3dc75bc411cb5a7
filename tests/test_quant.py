"""Quantized bases (int8, NF4): every meaningful method attaches, trains and round-trips; the others refuse
clearly; storage sizes, optimizers, gradient checkpointing and the qlora preset's config resolution."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.config import ModelConfig, TrainConfig, load_config
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.methods import trainable_parameters
from deltatune.quantize import (
    QuantSpec,
    prepare_for_training,
    quantization_of,
    quantize_model,
    quantized_layer_names,
    weight_bytes,
)
from deltatune.training import optim
from deltatune.training.optim import build_optimizer

pytest.importorskip("bitsandbytes")

IDS = torch.tensor([[1, 17, 250, 3000, 42, 9, 77, 5], [1, 8, 99, 1000, 7, 6, 300, 2]])
QUANTS = ["int8", "nf4"]
METHODS: list[tuple[str, dict[str, Any], bool]] = [  # id, config, attach keeps the outputs
    ("lora", {"name": "lora", "r": 2}, True),
    ("dora", {"name": "lora", "r": 2, "use_dora": True}, True),
    ("ia3", {"name": "ia3"}, True),
    ("adapter", {"name": "adapter", "variant": "houlsby", "reduction_factor": 8}, True),
    ("bitfit", {"name": "bitfit"}, True),
    ("prompt_tuning", {"name": "prompt_tuning", "num_virtual_tokens": 4, "init": "random"}, False),
    ("prefix_tuning", {"name": "prefix_tuning", "num_virtual_tokens": 4}, False),
]


@pytest.fixture(scope="module")
def bases(tiny_llama_dir: Path) -> dict[str, dt.LoadedModel]:
    """The tiny Llama loaded once per storage: float32, int8 and nf4 (+ double quantization)."""
    return {q: dt.load_model(ModelConfig(name=str(tiny_llama_dir), device="cpu", quantize=q), task="causal_lm")
            for q in ["none", *QUANTS]}


def logits(model: nn.Module) -> torch.Tensor:
    """Return the model's logits on the fixed batch, without gradients."""
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_load_quantizes_every_linear_but_the_head(bases: dict[str, dt.LoadedModel]) -> None:
    model = bases["nf4"].model
    names = quantized_layer_names(model)
    assert len(names) == 2 * 7 and "lm_head" not in names  # q k v o gate up down in 2 blocks
    assert quantization_of(model) == {"quantize": "nf4", "double_quant": True, "compute_dtype": "float32"}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)
    assert quantization_of(bases["none"].model) is None
    # the quantized model is close to the float one it came from (NF4 error on random weights)
    ref, out = logits(bases["none"].model), logits(model)
    assert not torch.equal(out, ref) and float(nn.functional.cosine_similarity(out.flatten(), ref.flatten(), 0)) > 0.8


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize(("case", "config", "keeps"), METHODS, ids=[m[0] for m in METHODS])
def test_method_over_quantized_base_attaches_trains_and_round_trips(
        quant: str, case: str, config: dict[str, Any], keeps: bool, bases: dict[str, dt.LoadedModel],
        tmp_path: Path) -> None:
    loaded = bases[quant]
    model = copy.deepcopy(loaded.model).eval()
    base_out = logits(model)
    method = dt.attach(model, config)
    if keeps:  # identity at attach: exactly the quantized base's outputs
        assert torch.equal(logits(model), base_out)
    params = trainable_parameters(model)
    assert params and not any(n.endswith(".weight") and re.search(r"_proj\.(base_layer\.)?weight$", n)
                              for n in params)
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(params.values(), lr=1e-2)
    model.train()
    with torch.no_grad():
        start = float(model(input_ids=IDS, labels=IDS).loss)
    for _ in range(4):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        end = float(model(input_ids=IDS, labels=IDS).loss)
    assert end < start - 1e-3, (start, end)
    want = logits(model)
    dt.save_delta(tmp_path, method, model, loaded.source, task="causal_lm")
    delta = dt.load_delta(tmp_path, device="cpu")
    assert delta.info.quantization == quantization_of(loaded.model)
    assert quantized_layer_names(delta.loaded.model)  # the base came back quantized, the same way
    assert torch.equal(logits(delta.loaded.model), want)


@pytest.mark.parametrize("config", [{"name": "full"}, {"name": "diff_pruning"}, {"name": "pafi"},
                                    {"name": "hiwi"}, {"name": "freeze", "layers": 1}],
                         ids=lambda c: c["name"])
def test_methods_that_train_base_weights_refuse_a_quantized_base(config: dict[str, Any],
                                                                 bases: dict[str, dt.LoadedModel]) -> None:
    model = copy.deepcopy(bases["nf4"].model)
    with pytest.raises(ConfigError, match=r"(quantized base|4/8-bit codes).*model\.quantize=none"):
        dt.attach(model, config)


def test_freeze_of_unquantized_modules_still_works(bases: dict[str, dt.LoadedModel]) -> None:
    model = copy.deepcopy(bases["int8"].model)
    dt.attach(model, {"name": "freeze", "layers": 0, "modules": ["norm"]})
    assert set(trainable_parameters(model)) == {"model.norm.weight"}


def test_qlora_needs_a_4bit_base_and_in_place_merge_refuses(bases: dict[str, dt.LoadedModel]) -> None:
    with pytest.raises(ConfigError, match=r"qlora trains LoRA over a 4-bit base.*not quantized"):
        dt.attach(copy.deepcopy(bases["none"].model), "qlora")
    with pytest.raises(ConfigError, match="quantized to int8"):
        dt.attach(copy.deepcopy(bases["int8"].model), "qlora")
    model = copy.deepcopy(bases["nf4"].model)
    method = dt.attach(model, "qlora")
    assert method.config.r == 64 and method.config.alpha == 16 and method.config.dropout == 0.1
    with pytest.raises(DeltatuneError, match=r"de-quantized copy.*deltatune merge"):
        dt.merge(model, method)


def test_storage_sizes_are_ordered_and_nf4_dq_is_about_4_bits() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    # a layer of realistic width: at toy widths the per-layer constants (a 256-entry code book) dominate
    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1536, num_hidden_layers=1,
                         num_attention_heads=8, num_key_value_heads=4)
    sizes: dict[str, int] = {}
    totals: list[int] = []
    for label, spec in [("nf4+dq", QuantSpec("nf4", True)), ("nf4", QuantSpec("nf4", False)),
                        ("int8", QuantSpec("int8", False)), ("float32", None)]:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        linear_numel = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, nn.Linear))
        if spec is not None:
            quantize_model(model, spec, torch.device("cpu"))
        found = weight_bytes(model)
        sizes[label] = found[label] if spec is not None else 4 * linear_numel
        totals.append(sum(found.values()))
    assert sizes["nf4+dq"] < sizes["nf4"] < sizes["int8"] < sizes["float32"]
    bits = {k: 8 * v / linear_numel for k, v in sizes.items()}
    assert 4.0 < bits["nf4+dq"] < 4.2 and 4.4 < bits["nf4"] < 4.6 and 8.0 < bits["int8"] < 8.1, bits
    assert bits["nf4+dq"] <= 0.16 * 32  # QLoRA's ~4.1 bits per parameter
    assert totals == sorted(totals) and len(set(totals)) == 4


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"])
def test_optimizer_choices_construct_and_step(name: str, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optim, "_said", set())
    torch.manual_seed(0)
    params = {"w": nn.Parameter(torch.randn(64, 128)), "b": nn.Parameter(torch.zeros(64))}
    optimizer = build_optimizer(params, TrainConfig(optimizer=name, weight_decay=0.1), 1e-2)
    before = {k: p.detach().clone() for k, p in params.items()}
    for _ in range(2):
        (params["w"].square().sum() + params["b"].sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(not torch.equal(p, before[k]) for k, p in params.items())
    assert float(params["w"].detach().square().sum()) < float(before["w"].square().sum())
    expected = {"adamw": "AdamW", "adamw_8bit": "AdamW8bit", "paged_adamw": "AdamW", "paged_adamw_8bit": "AdamW8bit"}
    assert type(optimizer).__name__ == expected[name]  # paging does not apply on the CPU
    build_optimizer(params, TrainConfig(optimizer=name), 1e-3)  # a second build says nothing more
    assert capsys.readouterr().out.count("paging needs CUDA") == (1 if name.startswith("paged") else 0)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_gradient_checkpointing_gives_the_same_gradients(quant: str, bases: dict[str, dt.LoadedModel]) -> None:
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(bases[quant].model)
        dt.attach(model, {"name": "lora", "r": 2})
        torch.manual_seed(1)
        with torch.no_grad():
            for p in trainable_parameters(model).values():
                p.normal_(0, 0.1)
        line = prepare_for_training(model, TrainConfig(gradient_checkpointing=checkpointing))
        assert line.startswith("base weights:") and ("gradient checkpointing on" in line) == checkpointing
        assert (quant == "nf4") == ("nf4+dq" in line)
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad.clone() for n, p in trainable_parameters(model).items()})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-5, rtol=1e-4), name


# ---- the qlora preset: config resolution -------------------------------------------------------------

def test_qlora_preset_fills_model_and_train_options() -> None:
    cfg = load_config(None, ["method.name=qlora"])
    assert (cfg.model.quantize, cfg.model.double_quant, cfg.train.optimizer) == ("nf4", True, "paged_adamw_8bit")
    assert cfg.method.name == "qlora" and cfg.method.targets == "all-linear"
    # a dumped config (every key at its default) takes the preset too, and re-validates unchanged
    again = load_config(None, ["method.name=qlora", "model.quantize=none", "train.optimizer=adamw"])
    assert again.model.quantize == "nf4" and again.train.optimizer == "paged_adamw_8bit"
    same = dt.config_from_dict(cfg.model_dump(mode="json"))
    assert same.model == cfg.model and same.train == cfg.train


@pytest.mark.parametrize(("override", "key"), [("model.quantize=int8", "model.quantize"),
                                               ("model.double_quant=false", "model.double_quant"),
                                               ("train.optimizer=adamw_8bit", "train.optimizer")])
def test_qlora_preset_conflicts_name_both_values(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["method.name=qlora", override])
    message = str(err.value)
    assert f"method.name=qlora sets {key}=" in message and override.split("=")[1] in message
    assert "use method.name=lora" in message and len(message.splitlines()) == 1


def test_model_quantization_options_validate() -> None:
    cfg = load_config(None, ["model.quantize=int8"])
    assert cfg.model.double_quant is None and cfg.train.optimizer == "adamw"
    with pytest.raises(ConfigError, match=r"model: double_quant=true applies to 4-bit"):
        load_config(None, ["model.quantize=int8", "model.double_quant=true"])
    with pytest.raises(ConfigError, match=r"model.quantize: Input should be 'none', 'int8', 'nf4' or 'fp4'"):
        load_config(None, ["model.quantize=nf2"])
    with pytest.raises(ConfigError, match=r"train.optimizer"):
        load_config(None, ["train.optimizer=sgd"])


@pytest.mark.parametrize("config", ["qlora", {"name": "compose", "methods": [{"name": "lora", "r": 2},
                                                                            {"name": "bitfit"}]}],
                         ids=["qlora", "compose"])
def test_disabled_gives_the_base_for_qlora_and_compose(config: object, bases: dict[str, dt.LoadedModel]) -> None:
    """The contract's disable switch for the two methods outside the main matrix: LoRA over the NF4 base, and
    a composition (each part switched off)."""
    model = copy.deepcopy(bases["nf4" if config == "qlora" else "none"].model)
    base = logits(model)
    method = dt.attach(model, config)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.05)
    trained = logits(model)
    assert (trained - base).abs().max() > 1e-4
    with method.disabled(model):
        assert torch.allclose(logits(model), base, atol=1e-6, rtol=0)
    assert torch.equal(logits(model), trained)
