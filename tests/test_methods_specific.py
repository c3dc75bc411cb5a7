"""What each non-prompt method promises beyond the shared contract, peft compatibility of IA3 and DoRA,
and `deltatune train` end to end with a few methods."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.cli import main
from deltatune.config import ModelConfig
from deltatune.errors import ConfigError
from deltatune.methods import trainable_parameters
from deltatune.methods.adapters import InputTap, ParallelAdapter, SequentialAdapter
from deltatune.methods.sparse import DiffLinear, SparseLinear, pafi_masks

IDS = torch.tensor([[1, 17, 250, 3000, 42, 9, 77, 5]])
BERT_IDS = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])


@pytest.fixture(scope="module")
def bases(tiny_llama_dir: Path, tiny_bert_dir: Path) -> dict[str, dt.LoadedModel]:
    return {"llama": dt.load_model(ModelConfig(name=str(tiny_llama_dir), device="cpu"), task="causal_lm"),
            "bert": dt.load_model(ModelConfig(name=str(tiny_bert_dir), device="cpu"), task="classification",
                                  num_labels=3)}


def fresh(bases: dict[str, dt.LoadedModel], kind: str) -> nn.Module:
    return copy.deepcopy(bases[kind].model).eval()


def randomize(model: nn.Module, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def test_bitfit_adds_zero_biases_and_the_merged_model_reloads(bases: dict[str, dt.LoadedModel],
                                                              tmp_path: Path) -> None:
    model = fresh(bases, "llama")
    assert model.model.layers[0].self_attn.q_proj.bias is None
    method = dt.attach(model, {"name": "bitfit"})
    q = model.model.layers[0].self_attn.q_proj
    assert q.bias is not None and q.bias.requires_grad and not q.bias.any()
    assert set(trainable_parameters(model)) == {f"model.layers.{i}.{m}.bias" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    randomize(model)
    want = model(IDS).logits
    merged = dt.merge(model, method)
    merged.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(again(IDS).logits, want, atol=1e-5)
    # BERT has every bias already: nothing is added, only the MLP biases train with biases=mlp
    bert = fresh(bases, "bert")
    method = dt.attach(bert, {"name": "bitfit", "biases": "mlp"})
    assert not method.added
    assert {n for n in trainable_parameters(bert) if not n.startswith("classifier.")} == {
        f"bert.encoder.layer.{i}.{m}.dense.bias" for i in range(2) for m in ("intermediate", "output")}


def test_diff_pruning_finalize_hits_the_sparsity_and_saves_a_sparse_delta(bases: dict[str, dt.LoadedModel],
                                                                          tmp_path: Path) -> None:
    model = fresh(bases, "llama")
    method = dt.attach(model, {"name": "diff_pruning", "sparsity": 0.99})
    reg = method.regularization(model)
    assert reg is not None and reg.requires_grad and float(reg) > 0
    randomize(model)
    method.finalize(model)
    layers = [m for m in model.modules() if isinstance(m, DiffLinear)]
    total = sum(m.diff.numel() for m in layers)
    nonzero = sum(int(m.delta().count_nonzero()) for m in layers)
    assert nonzero == round(0.01 * total)
    want = model(IDS).logits
    dt.save_delta(tmp_path, method, model, bases["llama"].source, task="causal_lm")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(v.numel() for k, v in tensors.items() if k.endswith(".diff_values")) == nonzero
    assert all(v.dtype == torch.int64 for k, v in tensors.items() if k.endswith(".diff_indices"))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "DIFF_PRUNING"
    assert torch.equal(dt.load_delta(tmp_path, device="cpu").loaded.model(IDS).logits, want)


def test_pafi_mask_is_the_smallest_magnitude_weights(bases: dict[str, dt.LoadedModel]) -> None:
    model = fresh(bases, "llama")
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n != "lm_head"}
    dt.attach(model, {"name": "pafi", "sparsity": 0.95})
    masks = {n: m.indices for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert set(masks) == set(weights)
    chosen = torch.cat([weights[n].abs().flatten()[masks[n]] for n in weights])
    rest = torch.cat([weights[n].abs().flatten()[~torch.isin(torch.arange(weights[n].numel()), masks[n])]
                      for n in weights])
    assert chosen.numel() == round(0.05 * (chosen.numel() + rest.numel()))
    assert chosen.max() <= rest.min()  # global: the smallest over all matrices together
    per = pafi_masks(weights, 0.95, "per_matrix")
    for n, w in weights.items():
        assert per[n].numel() == round(0.05 * w.numel())
        inside = torch.zeros(w.numel(), dtype=torch.bool)
        inside[per[n]] = True
        assert w.abs().flatten()[inside].max() <= w.abs().flatten()[~inside].min()


def test_freeze_trains_the_top_blocks_and_named_modules(bases: dict[str, dt.LoadedModel]) -> None:
    model = fresh(bases, "llama")
    dt.attach(model, {"name": "freeze", "layers": 1, "modules": ["norm"]})
    names = set(trainable_parameters(model))
    assert "model.norm.weight" in names and "model.layers.1.mlp.up_proj.weight" in names
    assert not any(n.startswith("model.layers.0.") or "embed" in n for n in names)
    with pytest.raises(ConfigError, match="blocks"):
        dt.attach(fresh(bases, "llama"), {"name": "freeze", "layers": 3})


@pytest.mark.parametrize(("variant", "kind", "count"), [
    ("houlsby", "llama", 4), ("pfeiffer", "llama", 2), ("parallel", "llama", 2),
    ("houlsby", "bert", 4), ("pfeiffer", "bert", 2), ("parallel", "bert", 2)])
def test_adapter_variants_sit_where_the_papers_put_them(variant: str, kind: str, count: int,
                                                        bases: dict[str, dt.LoadedModel]) -> None:
    model = fresh(bases, kind)
    dt.attach(model, {"name": "adapter", "variant": variant, "reduction_factor": 4})
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, (SequentialAdapter, ParallelAdapter))}
    assert len(wrapped) == count
    ffn_out = "mlp.down_proj" if kind == "llama" else ".output.dense"
    attn_out = "self_attn.o_proj" if kind == "llama" else "attention.output.dense"
    assert sum(n.endswith(ffn_out) and "attention" not in n for n in wrapped) == 2
    assert sum(n.endswith(attn_out) for n in wrapped) == (2 if variant == "houlsby" else 0)
    taps = [m for m in model.modules() if isinstance(m, InputTap)]
    assert len(taps) == (2 if variant == "parallel" else 0)
    if variant == "parallel":
        assert all(m.scaling == 4.0 for m in wrapped.values())
    hidden = 64 if kind == "llama" else 32
    assert all(m.adapter.adapter_down.out_features == hidden // 4 for m in wrapped.values())


def test_hiwi_on_biases_needs_biases(bases: dict[str, dt.LoadedModel]) -> None:
    with pytest.raises(ConfigError, match="no bias"):
        dt.attach(fresh(bases, "llama"), {"name": "hiwi", "on": "biases"})
    model = fresh(bases, "bert")
    base = model(input_ids=BERT_IDS).logits
    method = dt.attach(model, {"name": "hiwi", "on": "biases", "bottleneck": 2})
    assert torch.equal(model(input_ids=BERT_IDS).logits, base)
    randomize(model, 0.5)
    want = model(input_ids=BERT_IDS).logits
    w0 = model.bert.encoder.layer[0].intermediate.dense.base_layer.weight.clone()
    merged = dt.merge(model, method)
    assert torch.equal(merged.bert.encoder.layer[0].intermediate.dense.weight, w0)  # only biases moved
    assert torch.allclose(merged(input_ids=BERT_IDS).logits, want, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("config", [{"name": "ia3"}, {"name": "lora", "r": 2, "use_dora": True}],
                         ids=["ia3", "dora"])
def test_real_peft_loads_ia3_and_dora_deltas(config: dict, kind: str, bases: dict[str, dt.LoadedModel],
                                             tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = fresh(bases, kind)
    method = dt.attach(model, config)
    randomize(model)
    ids = IDS if kind == "llama" else BERT_IDS
    want = model(input_ids=ids).logits
    task = "causal_lm" if kind == "llama" else "classification"
    dt.save_delta(tmp_path, method, model, bases[kind].source, task=task)
    peft_model = peft.PeftModel.from_pretrained(fresh(bases, kind), str(tmp_path)).eval()
    assert torch.allclose(peft_model(input_ids=ids).logits, want, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_peft_made_ia3_loads_in_deltatune(kind: str, bases: dict[str, dt.LoadedModel], tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    task_type = "CAUSAL_LM" if kind == "llama" else "SEQ_CLS"
    peft_model = peft.get_peft_model(fresh(bases, kind), peft.IA3Config(task_type=task_type, init_ia3_weights=False))
    peft_model.eval()
    ids = IDS if kind == "llama" else BERT_IDS
    want = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = bases[kind].source
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    if kind == "llama":
        model = dt.load_delta(tmp_path, device="cpu").loaded.model
    else:  # a peft-made SEQ_CLS delta does not record its number of labels: load onto the 3-label model
        from deltatune.delta import read_delta_info, read_delta_tensors
        from deltatune.methods import build_method

        model = fresh(bases, kind)
        method = build_method(read_delta_info(tmp_path).method_config)
        method.attach(model)
        method.load_delta_state_dict(model, read_delta_tensors(tmp_path))
    assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5)


@pytest.mark.parametrize("method", [["method.name=bitfit"], ["method.name=ia3"],
                                    ["method.name=diff_pruning", "method.sparsity=0.9"]],
                         ids=lambda m: m[0].split("=")[1])
def test_deltatune_train_end_to_end(method: list[str], tiny_llama_dir: Path, tmp_path: Path) -> None:
    rows = [{"prompt": f"Colour of thing {i}?", "completion": ["red", "green", "blue"][i % 3]} for i in range(12)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["train", f"model.name={tiny_llama_dir}", f"data.train={data}", f"output.dir={out}",
                 "train.max_steps=3", "train.batch_size=4", "data.eval=0.25", "--no-progress", *method]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_llama_dir)
    delta = dt.load_delta(out, device="cpu")
    assert delta.method.name == method[0].split("=")[1]
    if delta.method.name == "diff_pruning":  # finalize ran before saving
        values = [v for k, v in load_file(out / "adapter_model.safetensors").items() if k.endswith("_values")]
        total = sum(m.diff.numel() for m in delta.loaded.model.modules() if isinstance(m, DiffLinear))
        assert sum(v.numel() for v in values) <= round(0.1 * total)
