"""Preference tuning: the objectives against hand-written formulas and TRL, packed pairs against separate
sequences, the reference against the base, and training end to end on a tiny random Llama."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltatune.cli import main
from deltatune.compute.attention import enable_packed_attention
from deltatune.compute.preference import PreferenceObjective, reply_logps
from deltatune.config import method_config_class
from deltatune.data import load_examples
from deltatune.data.formats import to_examples
from deltatune.data.pairs import TokenizedPair, collate_pairs, tokenize_pairs
from deltatune.errors import DataError
from deltatune.methods import build_method, trainable_parameters
from deltatune.training.callbacks import Callback
from tests.test_train import metrics as records
from tests.test_train import train_args as args

WORDS = ["apple", "river", "stone", "cloud", "green", "quick", "seven", "table", "music", "light"]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "dpo_en_train.json"


def write_pairs(path: Path, n: int = 48, seed: int = 0) -> Path:
    """A learnable preference: the chosen reply ends with "yes", the rejected one (otherwise equal) with "no"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(4))
        rows.append({"prompt": "Say something about " + " ".join(rng.choice(WORDS) for _ in range(5)),
                     "chosen": body + " yes", "rejected": body + " no"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- the objectives on fixed log-probabilities -----------------------------------------------------------------

LOGPS = torch.tensor([-12.0, -15.0, -30.0, -28.0])  # pair 0: chosen, rejected; pair 1: chosen, rejected
COUNTS = torch.tensor([6.0, 5.0, 10.0, 7.0])
REF = torch.tensor([-13.0, -14.0, -29.0, -29.5])


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def hand(name: str, k: int, beta: float, eps: float = 0.0, gamma: float = 0.5, lam: float = 0.1) -> float:
    """The pair term of pair k, written out from the papers."""
    c, r = float(LOGPS[2 * k]), float(LOGPS[2 * k + 1])
    rc, rr = float(REF[2 * k]), float(REF[2 * k + 1])
    nc, nr = float(COUNTS[2 * k]), float(COUNTS[2 * k + 1])
    if name == "dpo":
        d = beta * ((c - rc) - (r - rr))
        return -(1 - eps) * math.log(sigmoid(d)) - eps * math.log(sigmoid(-d))
    if name == "ipo":
        return ((c - rc) / nc - (r - rr) / nr - 1 / (2 * beta)) ** 2
    if name == "simpo":
        return -math.log(sigmoid(beta * (c / nc - r / nr) - gamma))
    odds_c = math.exp(c / nc) / (1 - math.exp(c / nc))
    odds_r = math.exp(r / nr) / (1 - math.exp(r / nr))
    return -lam * math.log(sigmoid(math.log(odds_c / odds_r)))


@pytest.mark.parametrize(("name", "beta", "eps"), [("dpo", 0.1, 0.0), ("dpo", 0.5, 0.2), ("ipo", 0.1, 0.0),
                                                   ("simpo", 2.0, 0.0), ("orpo", 0.1, 0.0)])
def test_each_objective_equals_its_formula(name: str, beta: float, eps: float) -> None:
    objective = PreferenceObjective(name, beta, label_smoothing=eps, simpo_gamma=0.5, orpo_lambda=0.1)
    terms = objective.terms(LOGPS, COUNTS, REF if objective.needs_reference else None)
    for k in range(2):
        assert float(terms.loss[k]) == pytest.approx(hand(name, k, beta, eps), rel=1e-5)
    if name == "orpo":  # the NLL of the chosen replies rides along, summed over their tokens
        assert float(terms.nll_sum) == pytest.approx(12.0 + 30.0)
        assert torch.allclose(terms.chosen_rewards, 0.1 * LOGPS[0::2] / COUNTS[0::2])
    if name in ("dpo", "ipo"):
        assert torch.allclose(terms.chosen_rewards, beta * (LOGPS[0::2] - REF[0::2]))
    stats = terms.stats()
    margins = terms.chosen_rewards - terms.rejected_rewards
    assert stats["reward_margin"] == pytest.approx(float(margins.sum()))
    assert stats["reward_accuracy"] == float((margins > 0).sum())


def test_dpo_and_ipo_refuse_to_run_without_a_reference() -> None:
    with pytest.raises(ValueError, match="reference"):
        PreferenceObjective("dpo", 0.1).terms(LOGPS, COUNTS)


# ---- data ------------------------------------------------------------------------------------------------------

def test_every_preference_shape_is_detected_and_read_alike() -> None:
    user, a, b = {"role": "user", "content": "hi"}, "A", "B"
    shapes = [
        {"prompt": "hi", "chosen": a, "rejected": b},  # TRL standard
        {"prompt": [user], "chosen": [{"role": "assistant", "content": a}],
         "rejected": [{"role": "assistant", "content": b}]},  # TRL conversational, explicit prompt
        {"chosen": [user, {"role": "assistant", "content": a}],
         "rejected": [user, {"role": "assistant", "content": b}]},  # TRL conversational, implicit prompt
        {"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": a},
         "rejected": {"from": "gpt", "value": b}},  # LLaMA-Factory's ShareGPT ranking shape
    ]
    for record in shapes:
        (ex,) = to_examples([("p.jsonl:1", record)])
        assert [(m.role, m.content) for m in ex.messages or []] == [("user", "hi")]
        assert ex.chosen is not None and ex.rejected is not None
        assert (ex.chosen.content, ex.rejected.content) == (a, b)


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "hi", "chosen": "A"}, "missing field 'rejected'"),
    ({"prompt": "hi", "chosen": "A", "rejected": 3}, "field 'rejected' must be a string"),
    ({"prompt": "hi", "chosen": "A", "rejected": "  "}, "field 'rejected' is empty"),
    ({"chosen": [{"role": "assistant", "content": "A"}], "rejected": [{"role": "assistant", "content": "B"}]},
     "must end with a user turn"),
    ({"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "human", "value": "A"},
      "rejected": {"from": "gpt", "value": "B"}}, "chosen must be the assistant's turn"),
    ({"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "A"},
      "rejected": "B"}, "rejected: expected an object"),
])
def test_a_malformed_pair_stops_with_file_and_line(record: dict, message: str, tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    good = ({"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "A"},
             "rejected": {"from": "gpt", "value": "B"}} if "conversations" in record
            else {"prompt": "hi", "chosen": "A", "rejected": "B"})
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=message) as err:
        load_examples(str(path))
    assert f"{path}:2" in str(err.value)


def test_the_shared_data_set_reads_as_pairs() -> None:
    if not SHARED.is_file():
        pytest.skip("../shared/data is not beside this checkout (a user's clone): nothing to read")
    examples = load_examples(str(SHARED))
    assert len(examples) == 200 and all(e.is_pair for e in examples)


# ---- packed pairs compute what separate sequences compute ------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path) -> tuple[torch.nn.Module, object]:
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


def some_pairs(tokenizer: object, n: int = 3) -> list[TokenizedPair]:
    rows = [{"prompt": f"Tell me about {' '.join(WORDS[i:i + 3 + i])}", "chosen": " ".join(WORDS[: 2 + i]),
             "rejected": " ".join(WORDS[5 - i:9])} for i in range(n)]
    pairs, _ = tokenize_pairs(to_examples([(f"x:{i}", r) for i, r in enumerate(rows)]), tokenizer, max_length=256,
                              truncation="error")
    return pairs


def alone(model: torch.nn.Module, prompt: list[int], reply: list[int], labels: list[int]) -> float:
    """The reply's summed log-probability, the prompt and reply run as one ordinary sequence."""
    ids = torch.tensor([prompt + reply])
    logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(float(logp[len(prompt) + j - 1, t]) for j, (t, lab) in enumerate(zip(reply, labels, strict=True))
               if lab != -100)


@pytest.mark.parametrize("attention", ["mask", "per-pair"])
def test_packed_pairs_give_each_reply_its_own_log_probability(attention: str, tiny: tuple) -> None:
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    pairs = some_pairs(tokenizer)
    assert all(len(p.prompt_ids) > 5 for p in pairs)  # the prompt really is shared
    if attention == "per-pair":
        assert enable_packed_attention(model)
    with torch.no_grad():
        logps, counts = reply_logps(model, collate_pairs(pairs, block_mask=attention == "mask"))
        want = [alone(model, p.prompt_ids, reply, labels) for p in pairs
                for reply, labels in ((p.chosen_ids, p.chosen_labels), (p.rejected_ids, p.rejected_labels))]
    assert logps.tolist() == pytest.approx(want, rel=1e-4, abs=1e-4)
    with torch.no_grad():  # a filler segment rounding the row up (bf16 runs) changes nothing
        padded = collate_pairs(pairs, block_mask=attention == "mask", pad_multiple=64)
        assert padded["input_ids"].shape[1] % 64 == 0 and int(padded["num_tokens"]) == sum(
            len(p.input_ids) for p in pairs)
        assert torch.allclose(reply_logps(model, padded)[0], logps, atol=1e-5)
    assert counts.tolist() == [sum(lab != -100 for lab in labels) for p in pairs
                               for labels in (p.chosen_labels, p.rejected_labels)]


def test_a_pair_is_tokenized_as_its_two_conversations(tiny: tuple) -> None:
    _, tokenizer = tiny
    (example,) = to_examples([("x:1", {"prompt": "hi there", "chosen": "good answer", "rejected": "bad"})])
    (pair,), _ = tokenize_pairs([example], tokenizer, max_length=256, truncation="error")
    full = tokenizer.apply_chat_template([{"role": "user", "content": "hi there"},
                                          {"role": "assistant", "content": "good answer"}], tokenize=False)
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids[:len(pair.prompt_ids + pair.chosen_ids)] == pair.prompt_ids + pair.chosen_ids
    supervised = tokenizer.decode([t for t, lab in zip(pair.chosen_ids, pair.chosen_labels, strict=True)
                                   if lab != -100])
    assert supervised == "good answer<|im_end|>"  # the reply and its end-of-turn, nothing of the prompt


# ---- the reference is the base ---------------------------------------------------------------------------------

def lora(model: torch.nn.Module, r: int = 4) -> object:
    cfg = method_config_class("lora")(name="lora", r=r, alpha=8, targets=["q_proj", "v_proj"], dropout=0.0)
    method = build_method(cfg)
    method.attach(model)
    torch.manual_seed(1)
    for name, p in trainable_parameters(model).items():  # a trained-looking delta: B no longer zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return method


def test_the_reference_log_probs_are_a_freshly_loaded_bases(tiny_llama_dir: Path, tiny: tuple) -> None:
    from deltatune.training.preference import as_reference

    _, tokenizer = tiny
    batch = collate_pairs(some_pairs(tokenizer))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    method = lora(model)
    with torch.no_grad():
        tuned, _ = reply_logps(model, batch)
    with as_reference(method, model):
        ref, _ = reply_logps(model, batch)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        base, _ = reply_logps(fresh, batch)
    assert torch.equal(ref, base)
    assert not torch.allclose(tuned, base, atol=1e-2)  # the delta does change them


# ---- one DPO step equals TRL's DPOTrainer ----------------------------------------------------------------------

def test_one_dpo_step_matches_trls_dpo_trainer(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """TRL's DPOTrainer (peft LoRA, beta 0.1) and deltatune on the same token sequences: the same loss and the same
    gradient of every LoRA weight. The sequences are TRL's own tokenization, so the objective, the packing with a
    shared prompt and the reference under the disable switch are what is compared."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    rows = [json.loads(line) for line in write_pairs(tmp_path / "p.jsonl", n=4).read_text().splitlines()]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                         args=DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=1,
                                        report_to=[], use_cpu=True, beta=0.1),
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                lora_dropout=0.0),
                         train_dataset=data, processing_class=tokenizer)
    peer = trainer.model
    assert "ref" not in peer.peft_config  # a new adapter: TRL's reference is the base, the adapter disabled
    ours = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    method = lora(ours)
    mine = trainable_parameters(ours)
    theirs = {n.replace("base_model.model.", "").replace(".default", ""): p for n, p in peer.named_parameters()
              if p.requires_grad}
    assert mine.keys() == theirs.keys()
    with torch.no_grad():
        for name, p in mine.items():
            theirs[name].copy_(p)
    batch = next(iter(trainer.get_train_dataloader()))
    peer.train()
    trl_loss = trainer.compute_loss(peer, batch)
    trl_loss.backward()

    pairs = []  # TRL's rows: [chosen x4; rejected x4], left-aligned, completion_mask on the reply
    for k in range(4):
        rows_k = []
        for row in (k, k + 4):
            keep = batch["attention_mask"][row].bool()
            ids = batch["input_ids"][row][keep].tolist()
            reply = batch["completion_mask"][row][keep].bool().tolist()
            rows_k.append((ids[:reply.index(True)], ids[reply.index(True):]))
        (prompt, chosen), (prompt_r, rejected) = rows_k
        assert prompt == prompt_r
        pairs.append(TokenizedPair(prompt, chosen, chosen, rejected, rejected, f"x:{k}"))
    from deltatune.training.preference import Reference

    packed = collate_pairs(pairs)
    ours.train()
    logps, counts = reply_logps(ours, packed)
    ref = Reference(method, ours, None, chunked=True).logps("train", packed, range(4))
    loss = PreferenceObjective("dpo", 0.1).terms(logps, counts, ref).loss.mean()
    loss.backward()
    loss = loss.detach()
    assert float(loss) == pytest.approx(float(trl_loss), rel=1e-5)
    assert abs(float(loss) - math.log(2)) > 1e-3  # the policy is not the reference
    for name, p in mine.items():
        # float32 rounding: gradients of up to ~0.25 agree to a few 1e-7 (the log-softmax is computed differently)
        assert torch.allclose(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-6), name
    assert any(float(p.grad.abs().max()) > 1e-6 for p in mine.values())


# ---- training end to end ---------------------------------------------------------------------------------------

def next_token_prefers_chosen(model_dir: Path, delta: Path | None, pairs_file: Path) -> float:
    """Share of pairs whose greedy next token after the prompt and the shared reply body is the chosen word."""
    import deltatune as dt

    model = dt.load_delta(delta).loaded.model if delta is not None else AutoModelForCausalLM.from_pretrained(model_dir)
    model = model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    yes = tokenizer(" yes", add_special_tokens=False)["input_ids"]
    hits = []
    for line in pairs_file.read_text().splitlines()[:16]:
        row = json.loads(line)
        body = row["chosen"].rsplit(" ", 1)[0]
        text = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                             add_generation_prompt=True) + body
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            hits.append(int(model(ids).logits[0, -1].argmax()) == yes[0])
    return sum(hits) / len(hits)


@pytest.mark.parametrize("objective", ["dpo", "ipo", "simpo", "orpo"])
def test_a_synthetic_preference_is_learned(objective: str, tiny_llama_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = write_pairs(tmp_path / "p.jsonl", n=48)
    out = tmp_path / objective
    assert main(args(tiny_llama_dir, data, out, f"train.objective={objective}", "train.max_steps=40",
                     "train.lr=1e-2", "data.eval=0.25")) == 0
    evals = [r for r in records(out) if "eval_reward_accuracy" in r]
    assert evals[-1]["eval_reward_accuracy"] == 1.0
    assert evals[-1]["eval_reward_margin"] > evals[0]["eval_reward_margin"]
    steps = [r for r in records(out) if "loss" in r]
    assert {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"} <= steps[-1].keys()
    if objective == "dpo":
        assert evals[0]["eval_reward_margin"] == 0.0  # the policy starts as the reference
        assert next_token_prefers_chosen(tiny_llama_dir, None, data) == 0.0
        assert next_token_prefers_chosen(tiny_llama_dir, out, data) == 1.0
        assert main(["eval", str(out), "--data", str(data)]) == 0  # the delta alone, on the pairs, as `deltatune eval`
        figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert figures["objective"] == "dpo" and figures["pairs"] == 48
        assert figures["eval_reward_accuracy"] == 1.0 and figures["eval_reward_margin"] > 1.0


def test_full_fine_tuning_uses_a_precomputed_reference_that_resume_reads(tiny_llama_dir: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    data = write_pairs(tmp_path / "p.jsonl", n=24)
    common = ("method.name=full", "train.objective=dpo", "train.max_steps=6", "train.lr=1e-4", "data.eval=0.25")

    def run(out: Path, *extra: str, callbacks: tuple = ()) -> int:
        return main([a for a in args(tiny_llama_dir, data, out, *common, *extra) if a != "method.r=4"],
                    callbacks=list(callbacks))

    straight = tmp_path / "straight"
    assert run(straight) == 0
    said = capsys.readouterr().out
    assert "computed once before training (method 'full' has no disable switch)" in said
    table = load_file(straight / "reference_logps.safetensors")
    assert table["train"].shape == (18, 2) and table["eval"].shape == (6, 2)

    class CtrlCAfterStep3(Callback):
        def on_step_end(self, run: object, metrics: dict) -> None:
            if metrics["step"] == 3:
                raise KeyboardInterrupt

    resumed = tmp_path / "resumed"
    assert run(resumed, callbacks=(CtrlCAfterStep3(),)) == 130
    capsys.readouterr()
    assert run(resumed, "--resume") == 0
    assert "reference: log-probabilities read from" in capsys.readouterr().out
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in records(resumed) if "loss" in r] == list(range(1, 7))


def test_lora_dpo_resume_equals_an_uninterrupted_run(tiny_llama_dir: Path, tmp_path: Path) -> None:
    data = write_pairs(tmp_path / "p.jsonl", n=24)
    common = ("train.objective=dpo", "train.max_steps=6", "train.lr=5e-3", "data.eval=null")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(args(tiny_llama_dir, data, straight, *common)) == 0

    class CtrlCAfterStep4(Callback):
        def on_step_end(self, run: object, metrics: dict) -> None:
            if metrics["step"] == 4:
                raise KeyboardInterrupt

    assert main(args(tiny_llama_dir, data, resumed, *common), callbacks=[CtrlCAfterStep4()]) == 130
    assert main([*args(tiny_llama_dir, data, resumed, *common), "--resume"]) == 0
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in records(straight) if "loss" in r] == [r["loss"] for r in records(resumed) if "loss" in r]


@pytest.mark.parametrize(("extra", "message"), [
    (("train.objective=sft",), "holds preference pairs"),
    (("train.objective=simpo", "train.label_smoothing=0.1"), "label_smoothing applies to dpo only"),
])
def test_objective_and_data_must_agree(extra: tuple, message: str, tiny_llama_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    data = write_pairs(tmp_path / "p.jsonl", n=8)
    assert main(args(tiny_llama_dir, data, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_preference_objective_on_supervised_data_is_refused(tiny_llama_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "completion": "there"}) + "\n")
    assert main(args(tiny_llama_dir, data, tmp_path / "out", "train.objective=dpo")) == 2
    assert "needs preference pairs" in capsys.readouterr().err


def test_compare_runs_methods_on_pairs_and_ranks_by_reward_accuracy(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Three kinds of reference: LoRA (switch off the wrapper), prompt tuning (switch off the virtual tokens; pairs
    through the 4D mask with the prefix in front) and full (the table computed before training)."""
    import yaml

    tree = {"model": {"name": str(tiny_llama_dir)},
            "data": {"train": str(write_pairs(tmp_path / "p.jsonl", n=24)), "eval": 0.25},
            "train": {"max_steps": 4, "batch_size": 4, "objective": "dpo"},
            "compare": {"latency_tokens": 2, "latency_repeats": 1}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "run.yaml"), "--methods", "lora,prompt_tuning,full", "-o", str(out)]) == 0
    results = {r["method"]: r for r in json.loads((out / "results.json").read_text())["methods"]}
    assert all(r["status"] == "finished" and r["metric"] == "reward_accuracy" for r in results.values())
    assert all(0.0 <= r["metric_value"] <= 1.0 and r["reward_margin"] is not None for r in results.values())
    report = (out / "report.md").read_text()
    assert "reward accuracy" in report and "reward margin" in report and "- best reward accuracy:" in report
