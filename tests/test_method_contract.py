"""One contract matrix over every non-prompt method, on a tiny Llama (causal LM) and a tiny BERT classifier.

For each (method, model): only the method's parameters train; the attached model computes what the base
computes; save -> load is bit-identical; merge equals unmerged with no method modules left (or a clear
error); a few steps lower the loss and change exactly the trainable parameters.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.config import ModelConfig
from deltatune.errors import DeltatuneError
from deltatune.methods import trainable_parameters


@dataclass(frozen=True)
class Case:
    id: str
    config: dict[str, Any]
    mergeable: bool
    owns: str  # regex every trainable parameter name (other than a classifier head) matches
    exact: bool = True  # attach leaves the outputs bit-identical (else atol 1e-6)


METHODS = [
    Case("lora", {"name": "lora", "r": 2}, True, r".*\.lora_[AB]\.weight"),
    Case("dora", {"name": "lora", "r": 2, "use_dora": True}, True, r".*\.lora_([AB]\.weight|magnitude_vector)"),
    Case("full", {"name": "full"}, True, r".*"),
    Case("freeze", {"name": "freeze", "layers": 1}, True, r".*\.(layers|layer)\.1\..*"),
    Case("bitfit", {"name": "bitfit"}, True, r".*\.bias", exact=False),
    Case("diff_pruning", {"name": "diff_pruning", "sparsity": 0.9, "l0_strength": 1e-4}, True,
         r".*\.(diff|log_alpha)"),
    Case("pafi", {"name": "pafi", "sparsity": 0.9}, True, r".*\.values"),
    Case("adapter_houlsby", {"name": "adapter", "variant": "houlsby", "reduction_factor": 8}, False,
         r".*\.adapter\.adapter_(down|up)\.(weight|bias)"),
    Case("adapter_parallel", {"name": "adapter", "variant": "parallel", "reduction_factor": 8}, False,
         r".*\.adapter\.adapter_(down|up)\.(weight|bias)"),
    Case("ia3", {"name": "ia3"}, True, r".*\.ia3_l"),
    Case("hiwi", {"name": "hiwi", "bottleneck": 4}, True, r".*\.hiwi_(down|up)"),
]
MODELS = ["llama", "bert"]
LLAMA_IDS = torch.tensor([[1, 17, 250, 3000, 42, 9, 77, 5], [1, 8, 99, 1000, 7, 6, 300, 2]])
BERT_IDS = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 2307, 2154, 2000, 2017, 102]])


@pytest.fixture(scope="module")
def bases(tiny_llama_dir: Path, tiny_bert_dir: Path) -> dict[str, dt.LoadedModel]:
    """Each tiny model loaded once; tests work on deep copies."""
    return {"llama": dt.load_model(ModelConfig(name=str(tiny_llama_dir), device="cpu"), task="causal_lm"),
            "bert": dt.load_model(ModelConfig(name=str(tiny_bert_dir), device="cpu"), task="classification",
                                  num_labels=3)}


def fresh(bases: dict[str, dt.LoadedModel], kind: str) -> nn.Module:
    """Return a deep copy of the base model of ``kind``, in eval mode."""
    return copy.deepcopy(bases[kind].model).eval()


def logits(model: nn.Module, kind: str) -> torch.Tensor:
    """Return the model's logits on the fixed batch, without gradients."""
    with torch.no_grad():
        return model(input_ids=LLAMA_IDS if kind == "llama" else BERT_IDS).logits


def loss(model: nn.Module, kind: str) -> torch.Tensor:
    """Return the loss on the fixed batch (next tokens, or labels 0 and 2)."""
    if kind == "llama":
        return model(input_ids=LLAMA_IDS, labels=LLAMA_IDS).loss
    return model(input_ids=BERT_IDS, labels=torch.tensor([0, 2])).loss


def randomize(model: nn.Module) -> None:
    """Move every trainable parameter away from its init, as training would."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.05)


def is_method_module(module: nn.Module) -> bool:
    """Whether ``module`` is one of deltatune's own wrapper modules."""
    return type(module).__module__.startswith("deltatune.")


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("case", METHODS, ids=lambda c: c.id)
def test_attach_trains_only_the_method_and_keeps_outputs(case: Case, kind: str,
                                                         bases: dict[str, dt.LoadedModel]) -> None:
    model = fresh(bases, kind)
    base_out = logits(model, kind)
    dt.attach(model, case.config)
    names = set(trainable_parameters(model))
    heads = {n for n in names if n.startswith("classifier.")}
    assert names - heads, "nothing of the method trains"
    assert all(re.fullmatch(case.owns, n) for n in names - heads), sorted(names - heads)
    assert (kind == "bert") == bool(heads)
    if case.id not in ("full", "freeze", "bitfit"):  # the base's own tensors stay frozen
        assert all(not re.fullmatch(case.owns, n) for n, p in model.named_parameters() if not p.requires_grad)
    out = logits(model, kind)
    if case.exact:
        assert torch.equal(out, base_out)
    else:
        assert torch.allclose(out, base_out, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("case", METHODS, ids=lambda c: c.id)
def test_save_load_is_bit_identical_and_merge_matches(case: Case, kind: str, bases: dict[str, dt.LoadedModel],
                                                      tmp_path: Path) -> None:
    loaded = bases[kind]
    model = fresh(bases, kind)
    method = dt.attach(model, case.config)
    randomize(model)
    want = logits(model, kind)
    assert (want - logits(fresh(bases, kind), kind)).abs().max() > 1e-4  # the delta is real
    task = "causal_lm" if kind == "llama" else "classification"
    dt.save_delta(tmp_path, method, model, loaded.source, task=task)
    delta = dt.load_delta(tmp_path, device="cpu")
    assert torch.equal(logits(delta.loaded.model, kind), want)
    if case.mergeable:
        merged = dt.merge(model, method)
        assert not any(is_method_module(m) for m in merged.modules())
        assert torch.allclose(logits(merged, kind), want, atol=1e-4, rtol=0)
    else:
        with pytest.raises(DeltatuneError, match=case.config["name"]):
            dt.merge(model, method)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("case", METHODS, ids=lambda c: c.id)
def test_steps_lower_the_loss_and_change_exactly_the_trainable(case: Case, kind: str,
                                                               bases: dict[str, dt.LoadedModel]) -> None:
    torch.manual_seed(0)
    model = fresh(bases, kind)
    method = dt.attach(model, case.config)
    params = trainable_parameters(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        start = float(loss(model, kind))
    optimizer = torch.optim.Adam(params.values(), lr=1e-2)
    model.train()
    for step in range(4):
        total = loss(model, kind)
        reg = method.regularization(model)
        if reg is not None:
            total = total + reg
        total.backward()
        optimizer.step()
        optimizer.zero_grad()
        method.after_step(model, step, 4)
    model.eval()
    with torch.no_grad():
        end = float(loss(model, kind))
    assert end < start
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(params)


@pytest.mark.parametrize("case", METHODS, ids=lambda c: c.id)
def test_disabled_computes_as_the_base_then_as_the_delta_again(case: Case, bases: dict[str, dt.LoadedModel]) -> None:
    """Every method has a switch back to the base (a preference-tuning reference costs no second model);
    full fine-tuning, which keeps no base copy, refuses with the reason."""
    model = fresh(bases, "llama")
    base_out = logits(model, "llama")
    method = dt.attach(model, case.config)
    randomize(model)
    trained = logits(model, "llama")
    assert (trained - base_out).abs().max() > 1e-4
    if case.id == "full":
        with pytest.raises(DeltatuneError, match="no disable switch: it trains every weight"), method.disabled(model):
            pass
        return
    training = set(trainable_parameters(model))
    with method.disabled(model):
        off = logits(model, "llama")
    if case.exact:
        assert torch.equal(off, base_out)
    else:
        assert torch.allclose(off, base_out, atol=1e-6, rtol=0)
    assert torch.equal(logits(model, "llama"), trained)  # switched back on: the trained delta, untouched
    assert set(trainable_parameters(model)) == training  # the same parameters train as before the block


def test_every_registered_method_meets_a_contract_matrix() -> None:
    """A method registered without a place in a contract matrix fails here: this file's matrix, the prompt
    methods' (test_prompt_methods.py), compose's and qlora's (their own files)."""
    from deltatune.methods import registered_methods

    elsewhere = {"prompt_tuning", "p_tuning", "prefix_tuning", "compose", "qlora"}
    here = {case.config["name"] for case in METHODS}
    assert set(registered_methods()) <= here | elsewhere, set(registered_methods()) - here - elsewhere
