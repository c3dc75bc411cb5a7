"""prompt_tuning, p_tuning and prefix_tuning on a tiny Llama and a tiny BERT classifier: the Method
contract, peft's formats both ways, packed and padded batches, generation and a CLI run."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.cli import main
from deltatune.config import ModelConfig
from deltatune.data.batching import block_causal_mask
from deltatune.errors import DeltatuneError
from deltatune.infer.generate import generate
from deltatune.methods import trainable_parameters

N = 4
METHODS: dict[str, dict[str, Any]] = {
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": N},
    "p_tuning_mlp": {"name": "p_tuning", "num_virtual_tokens": N, "encoder_hidden_size": 16},
    "p_tuning_lstm": {"name": "p_tuning", "num_virtual_tokens": N, "encoder": "lstm", "encoder_hidden_size": 8},
    "prefix_tuning": {"name": "prefix_tuning", "num_virtual_tokens": N},
    "prefix_projection": {"name": "prefix_tuning", "num_virtual_tokens": N, "projection": True,
                          "encoder_hidden_size": 16},
}
LLAMA_IDS = torch.tensor([[1, 17, 250, 3000, 42, 9, 77, 5], [1, 8, 99, 1000, 7, 6, 300, 2]])
BERT_IDS = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 2307, 2154, 2000, 2017, 102]])


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Tiny models gain nothing from a second thread, and lose 10x when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bases(tiny_llama_dir: Path, tiny_bert_dir: Path) -> dict[str, dt.LoadedModel]:
    """Each tiny model loaded once; tests attach to deep copies."""
    return {"llama": dt.load_model(ModelConfig(name=str(tiny_llama_dir), device="cpu"), task="causal_lm"),
            "bert": dt.load_model(ModelConfig(name=str(tiny_bert_dir), device="cpu"), task="classification",
                                  num_labels=3)}


def fresh(bases: dict[str, dt.LoadedModel], kind: str) -> nn.Module:
    return copy.deepcopy(bases[kind].model).eval()


def run(model: nn.Module, kind: str, **kw: Any) -> torch.Tensor:
    """Return the logits on the fixed batch, without gradients (inference)."""
    with torch.no_grad():
        return model(input_ids=LLAMA_IDS if kind == "llama" else BERT_IDS, **kw).logits


def attach(bases: dict[str, dt.LoadedModel], kind: str, method: str) -> tuple[nn.Module, dt.Method]:
    torch.manual_seed(0)
    model = fresh(bases, kind)
    return model, dt.attach(model, METHODS[method])


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("method", list(METHODS))
def test_contract_train_only_prompt_save_load_and_no_merge(method: str, kind: str, bases: dict[str, dt.LoadedModel],
                                                           tmp_path: Path) -> None:
    base = run(fresh(bases, kind), kind)
    model, m = attach(bases, kind, method)
    names = set(trainable_parameters(model))
    heads = {"classifier.weight", "classifier.bias"} if kind == "bert" else set()
    assert heads <= names and all(n.startswith("virtual_tokens.encoder.") for n in names - heads)
    want = run(model, kind)
    assert want.shape == base.shape and (want - base).abs().max() > 1e-4  # the input changed by design
    with m.disabled(model):
        assert torch.equal(run(model, kind), base)
    with pytest.raises(DeltatuneError, match=METHODS[method]["name"]):
        dt.merge(model, m)
    source = bases[kind].source
    dt.save_delta(tmp_path, m, model, source, task="causal_lm" if kind == "llama" else "classification")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == {"prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING",
                                "prefix_tuning": "PREFIX_TUNING"}[METHODS[method]["name"]]
    delta = dt.load_delta(tmp_path, device="cpu")
    assert torch.equal(run(delta.loaded.model, kind), want)
    # a few steps lower the loss
    model.train()
    params = list(trainable_parameters(model).values())
    opt = torch.optim.Adam(params, lr=5e-2)
    losses = []
    for _ in range(6):
        if kind == "llama":
            loss = model(input_ids=LLAMA_IDS, labels=LLAMA_IDS).loss
        else:
            loss = model(input_ids=BERT_IDS, labels=torch.tensor([0, 2])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses


def _peft_logits(peft_model: nn.Module, kind: str) -> torch.Tensor:
    """peft returns logits for its virtual positions too (prompt/p-tuning): keep the real ones."""
    peft_model.eval()
    out = run(peft_model, kind)
    return out[:, -LLAMA_IDS.shape[1]:] if kind == "llama" else out


@pytest.mark.parametrize("method", list(METHODS))
def test_peft_loads_the_delta_with_the_same_logits(method: str, bases: dict[str, dt.LoadedModel],
                                                   tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    # peft 0.21 cannot prefix-tune BERT under transformers 5 ("does not support past key values")
    kinds = ["llama"] if METHODS[method]["name"] == "prefix_tuning" else ["llama", "bert"]
    for kind in kinds:
        model, m = attach(bases, kind, method)
        want = run(model, kind)
        out = tmp_path / kind
        dt.save_delta(out, m, model, bases[kind].source, task="causal_lm" if kind == "llama" else "classification")
        peft_model = peft.PeftModel.from_pretrained(fresh(bases, kind), str(out))
        assert torch.allclose(_peft_logits(peft_model, kind), want, atol=1e-5), kind


def test_peft_made_deltas_load_in_deltatune(bases: dict[str, dt.LoadedModel], tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    configs = [peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
               peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=8,
                                        encoder_reparameterization_type="LSTM"),
               peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True,
                                       encoder_hidden_size=8)]
    for i, config in enumerate(configs):
        torch.manual_seed(i)
        peft_model = peft.get_peft_model(fresh(bases, "llama"), config)
        want = _peft_logits(peft_model, "llama")
        peft_model.save_pretrained(tmp_path / str(i))
        delta = dt.load_delta(tmp_path / str(i), device="cpu")
        assert torch.allclose(run(delta.loaded.model, "llama"), want, atol=1e-5), config.peft_type


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_lstm", "prefix_tuning"])
def test_packed_and_padded_rows_equal_each_example_alone(method: str, bases: dict[str, dt.LoadedModel]) -> None:
    model, _ = attach(bases, "llama", method)
    a, b = [1, 17, 250, 3000, 42], [1, 9, 77, 5, 600, 601, 602]
    row = torch.tensor([a + b])  # (1, 12): the loop's `pack` batch
    pos = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    mask = block_causal_mask([len(a), len(b)])  # (1, 1, 12, 12) additive
    keep = torch.tensor([1, 3, 6, 9])
    padded = torch.tensor([[*a, 2, 2], b])  # right padding, as collate's `pad`
    pad_mask = torch.tensor([[1] * 5 + [0, 0], [1] * 7])
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([a])).logits[0], model(input_ids=torch.tensor([b])).logits[0]])
        packed = model(input_ids=row, attention_mask=mask, position_ids=pos).logits[0]
        sparse = model(input_ids=row, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits[0]
        pad = model(input_ids=padded, attention_mask=pad_mask, position_ids=torch.arange(7)[None] * pad_mask).logits
    assert torch.allclose(packed, alone, atol=1e-4)
    assert torch.allclose(sparse, alone[keep], atol=1e-4)
    assert torch.allclose(torch.cat([pad[0, :5], pad[1]]), alone, atol=1e-4)


def test_bert_padded_batch_equals_each_example_alone(bases: dict[str, dt.LoadedModel]) -> None:
    for method in ("prompt_tuning", "prefix_tuning"):
        model, _ = attach(bases, "bert", method)
        ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 2023, 2003, 102, 0, 0]])
        with torch.no_grad():
            both = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
            alone = model(input_ids=ids[1:, :4]).logits
        assert torch.allclose(both[1], alone[0], atol=1e-5), method


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_mlp", "prefix_tuning"])
def test_generation_with_a_trained_prompt(method: str, bases: dict[str, dt.LoadedModel]) -> None:
    tokenizer = bases["llama"].tokenizer
    prompts = ["hi", "what colour is the sky?"]
    base_model = fresh(bases, "llama")
    base = generate(base_model, tokenizer, prompts, max_new_tokens=4)
    model, _ = attach(bases, "llama", method)
    target = tokenizer(" banana", add_special_tokens=False)["input_ids"][0]
    # train the prompt to answer every prompt with " banana": the last prompt position predicts it
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as generate numbers them
    opt = torch.optim.Adam(trainable_parameters(model).values(), lr=0.1)
    for _ in range(30):
        logits = model(**batch, position_ids=positions).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([target, target]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    replies = generate(model, tokenizer, prompts, max_new_tokens=4)
    assert all(isinstance(r, str) for r in replies)
    if method == "prefix_tuning":
        assert replies != base and all(r.startswith("banana") for r in replies), replies
    else:
        # this random 2-layer model predicts its own last token (the template's newline) whatever the input
        # embeddings are, so a soft prompt moves the next-token logits but not the greedy reply
        with torch.no_grad():
            moved = model(**batch, position_ids=positions).logits[:, -1]
            fixed = base_model(**batch, position_ids=positions).logits[:, -1]
        assert (moved - fixed).abs().max() > 1e-2
    # left-padded batched generation with the KV cache equals each prompt alone and a no-cache decode
    assert generate(model, tokenizer, prompts[1:], max_new_tokens=4) == replies[1:]
    ids = tokenizer(texts[0], return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=2)
        uncached = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=2, use_cache=False)
    assert torch.equal(cached, uncached)


def test_config_validation_and_text_init(bases: dict[str, dt.LoadedModel]) -> None:
    cls = dt.method_config_class("prompt_tuning")
    assert cls.model_validate({"init_text": "Answer"}).init == "text"
    with pytest.raises(ValueError, match="init_text"):
        cls.model_validate({"init": "text"})
    with pytest.raises(ValueError, match="init_text"):
        cls.model_validate({"init": "random", "init_text": "x"})
    with pytest.raises(ValueError, match="extra"):
        dt.method_config_class("p_tuning").model_validate({"encoder_size": 3})
    model = fresh(bases, "llama")
    method = dt.attach(model, {"name": "prompt_tuning", "num_virtual_tokens": 5, "init_text": "Answer briefly"})
    ids = bases["llama"].tokenizer("Answer briefly")["input_ids"]
    want = model.get_input_embeddings().weight[(ids * 5)[:5]]
    assert torch.equal(model.virtual_tokens.encoder(), want)
    cfg = method.adapter_config(model, "base")
    assert cfg["prompt_tuning_init"] == "TEXT" and cfg["tokenizer_name_or_path"] == bases["llama"].source
    with pytest.raises(DeltatuneError, match="already has virtual tokens"):
        dt.attach(model, {"name": "prefix_tuning"})


def test_cli_trains_prompt_tuning_and_writes_a_delta_that_loads(tiny_llama_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                          {"role": "assistant", "content": str(i + 1)}]} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["train", f"model.name={tiny_llama_dir}", f"data.train={data}", "method.name=prompt_tuning",
                 "method.num_virtual_tokens=4", "train.max_steps=3", "train.batch_size=4", "data.eval=null",
                 f"output.dir={out}", "--no-progress"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    delta = dt.load_delta(out, device="cpu")
    assert delta.method.name == "prompt_tuning"
    assert run(delta.loaded.model, "llama").shape == (2, 8, 49152)
