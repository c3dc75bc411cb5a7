"""The training loop end to end through the CLI, on a tiny random Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune.cli import main
from deltatune.training.callbacks import Callback

COLORS = {"apple": "red", "lime": "green", "sky": "blue", "banana": "yellow", "coal": "black", "snow": "white"}


def write_chat_data(path: Path, n: int = 48) -> Path:
    """A tiny learnable chat task: name the colour of a thing (the number is noise to ignore)."""
    things = list(COLORS)
    rows = [{"messages": [{"role": "user", "content": f"What colour is {things[i % 6]} number {i}?"},
                          {"role": "assistant", "content": COLORS[things[i % 6]]}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", f"model.name={model}", f"data.train={data}", f"output.dir={out}", "train.seed=3",
            "train.batch_size=4", "method.r=4", "--no-progress", *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_a_complete_run_and_lowers_eval_loss(tiny_llama_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    data = write_chat_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    assert main(train_args(tiny_llama_dir, data, out, "train.max_steps=30", "train.lr=1e-2",
                           "data.eval=0.25", "train.eval_every=10")) == 0
    assert "attention: packed rows attend per example" in capsys.readouterr().out
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "run.yaml", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "step-000030" / "state.json").is_file()
    evals = [m["eval_loss"] for m in metrics(out) if "eval_loss" in m]
    assert len(evals) == 4 and evals == sorted(evals, reverse=True) and evals[-1] < evals[0] - 2.0
    assert sum(1 for m in metrics(out) if "loss" in m) == 30
    card = (out / "README.md").read_text()
    assert "lora" in card and "steps: 30" in card and str(tiny_llama_dir) in card
    # run.yaml is the resolved config and reproduces the run's settings
    assert "max_steps: 30" in (out / "run.yaml").read_text()



def test_the_python_api_trains_twice_in_one_process(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # dt.train once lost to the subpackage of the same name: importing it rebound the attribute
    import deltatune as dt

    data = write_chat_data(tmp_path / "d.jsonl", n=8)
    for run in ("a", "b"):
        cfg = dt.load_config(None, [f"model.name={tiny_llama_dir}", f"data.train={data}", "method.r=4",
                                    f"output.dir={tmp_path / run}", "train.max_steps=2", "train.batch_size=4"])
        assert callable(dt.train)
        result = dt.train(cfg, progress=False)
        assert result.steps == 2 and (tmp_path / run / "adapter_model.safetensors").is_file()


def test_train_seconds_leave_out_evaluations_and_checkpoints(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import time

    import deltatune as dt

    class SlowEvaluations(dt.Callback):  # every evaluation takes 2 s more; counted, not guessed
        evaluations = 0

        def on_eval(self, run: object, metrics: dict) -> None:
            if "eval_loss" in metrics:
                SlowEvaluations.evaluations += 1
                time.sleep(2.0)

    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    cfg = dt.load_config(None, [f"model.name={tiny_llama_dir}", f"data.train={data}", "data.eval=0.25",
                                "method.r=4", f"output.dir={tmp_path / 'run'}", "train.max_steps=3",
                                "train.batch_size=4", "train.eval_every=1", "train.save_every=1"])
    result = dt.train(cfg, progress=False, callbacks=[SlowEvaluations()])
    assert result.steps == 3 and SlowEvaluations.evaluations == 4  # at the start, after steps 1 and 2, at the end
    assert result.seconds > 4 * 2.0
    assert result.train_seconds < 2.0  # the two evaluations inside the loop (4 s) are not training time


def test_the_speed_techniques_switch_off_one_by_one_with_the_same_losses(
        tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import deltatune.compute.loss as loss_module

    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    runs = {"on": (), "off": ("train.packed_attention=false", "train.fused_modules=false",
                              "train.chunked_loss=false")}
    losses, printed = {}, {}
    for name, extra in runs.items():
        if name == "off":  # the chunked loss must not run at all
            monkeypatch.setattr(loss_module, "linear_cross_entropy_sum", lambda *a, **k: pytest.fail("chunked"))
        assert main(train_args(tiny_llama_dir, data, tmp_path / name, "train.max_steps=3", *extra)) == 0
        printed[name] = capsys.readouterr().out
        losses[name] = [m["loss"] for m in metrics(tmp_path / name) if "loss" in m]
    for line in ("attention: packed rows attend per example", "fused RMSNorm/SwiGLU"):
        assert line in printed["on"] and line not in printed["off"]
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-5)

RESUME_CASES = {
    "lora": ("method.r=4", "method.dropout=0.1"),
    # pruned after step 4 of 8, interrupted in the fixed-mask phase: the mask must come back on resume
    "diff_pruning": ("method.name=diff_pruning", "method.sparsity=0.9", "method.prune_at=0.5"),
}


@pytest.mark.parametrize("method", list(RESUME_CASES))
def test_resume_after_ctrl_c_matches_an_uninterrupted_run(method: str, tiny_llama_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = write_chat_data(tmp_path / "d.jsonl")
    settings = ("train.max_steps=8", "data.eval=null", "train.lr=1e-3", *RESUME_CASES[method])
    base = [a for a in train_args(tiny_llama_dir, data, tmp_path, *settings) if a != "method.r=4"]

    def args(out: Path) -> list[str]:
        return [a if not a.startswith("output.dir=") else f"output.dir={out}" for a in base]

    straight = tmp_path / "straight"
    assert main(args(straight)) == 0

    class CtrlCAfterStep5(Callback):
        def on_step_end(self, run: object, metrics: dict) -> None:
            if metrics["step"] == 5:
                raise KeyboardInterrupt

    resumed = tmp_path / "resumed"
    assert main(args(resumed), callbacks=[CtrlCAfterStep5()]) == 130
    assert "--resume" in capsys.readouterr().err
    assert (resumed / "checkpoints" / "step-000005").is_dir()
    assert not (resumed / "adapter_model.safetensors").exists()  # no half-finished delta
    assert main([*args(resumed), "--resume"]) == 0
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in metrics(resumed) if "loss" in m] == list(range(1, 9))


def test_grad_accum_equals_the_larger_batch(tiny_llama_dir: Path, tmp_path: Path) -> None:
    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    common = ("train.max_steps=2", "data.eval=null", "train.lr=1e-3")
    big, acc = tmp_path / "big", tmp_path / "acc"
    assert main(train_args(tiny_llama_dir, data, big, *common, "train.batch_size=4")) == 0
    assert main(train_args(tiny_llama_dir, data, acc, *common, "train.batch_size=2", "train.grad_accum=2")) == 0
    a, b = load_file(big / "adapter_model.safetensors"), load_file(acc / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)


def test_bad_data_stops_before_training_with_file_and_line(tiny_llama_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = write_chat_data(tmp_path / "d.jsonl", n=4)
    lines = data.read_text().splitlines()
    lines[2] = '{"messages": [{"role": "user", "content": "hi"}'
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / "earlier-run.txt").write_text("keep me")
    assert main(train_args(tiny_llama_dir, data, out, "output.overwrite=true")) == 2
    err = capsys.readouterr().err
    assert f"{data}:3:" in err and "Traceback" not in err
    assert not (out / "adapter_model.safetensors").exists()
    assert (out / "earlier-run.txt").exists()  # bad data never clears an earlier run


def test_output_dir_is_not_overwritten_by_accident(tiny_llama_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = write_chat_data(tmp_path / "d.jsonl", n=8)
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(train_args(tiny_llama_dir, data, out, "train.max_steps=1")) == 2
    assert "already holds files deltatune did not write (keep.txt)" in capsys.readouterr().err
    assert (out / "keep.txt").exists()
    assert main([*train_args(tiny_llama_dir, data, out, "train.max_steps=1"), "--resume"]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err


def test_generate_merge_and_transformers_loads_the_merged_folder(tiny_llama_dir: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    from deltatune.delta import load_delta

    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    out, merged = tmp_path / "run", tmp_path / "merged"
    assert main(train_args(tiny_llama_dir, data, out, "train.max_steps=4", "train.lr=5e-3",
                           "data.eval=null")) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "What colour is sky number 3?", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    said = iter(["What colour is snow number 1?", "And coal?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(said))
    assert main(["chat", str(out), "--max-new-tokens", "4", "--merged"]) == 0
    assert capsys.readouterr().out.count("model> ") == 2
    assert main(["eval", str(out), "--data", str(data), "--generations", "4"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["examples"] == 16 and figures["eval_loss"] > 0 and figures["n"] == 4
    assert main(["merge", str(out), str(merged)]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    plain = AutoModelForCausalLM.from_pretrained(merged)
    ids = torch.tensor([[1, 5, 900, 42, 7]])
    want = load_delta(out, device="cpu").loaded.model(input_ids=ids).logits
    assert torch.allclose(plain(input_ids=ids).logits, want, atol=1e-4)
    assert main(["merge", str(out), str(merged)]) == 2  # never over an existing folder


def test_classification_run_reports_accuracy(tiny_bert_dir: Path, tmp_path: Path) -> None:
    rows = ["sentence\tlabel"] + [f"{w} movie {i}\t{int(w == 'great')}" for i in range(24)
                                   for w in (("great", "awful")[i % 2],)]
    data = tmp_path / "cls.tsv"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert main(["train", f"model.name={tiny_bert_dir}", f"data.train={data}", "data.eval=0.25",
                 f"output.dir={out}", "train.max_steps=25", "train.lr=1e-2", "train.batch_size=18",
                 "train.schedule=constant", "--no-progress"]) == 0
    evals = [m for m in metrics(out) if "eval_accuracy" in m]
    assert len(evals) == 2 and evals[-1]["eval_accuracy"] == 1.0
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"


def test_learning_rates_follow_the_method_the_head_and_the_gates() -> None:
    from deltatune.config import HEAD_LR, config_from_dict, load_config
    from deltatune.training.optim import build_optimizer, peak_learning_rates

    cfg = load_config(None, ["method.name=prompt_tuning"])
    assert peak_learning_rates(cfg.train, cfg.method, "causal_lm") == (3e-2, 3e-2)
    assert peak_learning_rates(cfg.train, cfg.method, "classification") == (3e-1, 3e-1)
    cfg = load_config(None, ["method.name=full"])  # the head never trains slower than HEAD_LR by default
    assert peak_learning_rates(cfg.train, cfg.method, "classification") == (1e-4, HEAD_LR)
    cfg = load_config(None, ["method.name=lora", "train.lr=5e-4"])  # an explicit rate also drives the head
    assert peak_learning_rates(cfg.train, cfg.method, "classification") == (5e-4, 5e-4)
    cfg = load_config(None, ["train.lr=5e-4", "train.head_lr=2e-3"])
    assert peak_learning_rates(cfg.train, cfg.method, "classification") == (5e-4, 2e-3)
    composed = config_from_dict({"method": [{"name": "ia3"}, {"name": "bitfit"}]})  # the first method's rate
    assert peak_learning_rates(composed.train, composed.method, "causal_lm") == (3e-3, 3e-3)
    params = {"w": torch.nn.Parameter(torch.zeros(2, 2)), "b": torch.nn.Parameter(torch.zeros(2)),
              "head.weight": torch.nn.Parameter(torch.zeros(2, 2))}
    opt = build_optimizer(params, cfg.train.model_copy(update={"weight_decay": 0.1}), 5e-4, {"head.weight": 2e-3})
    groups = {(g["lr"], g["weight_decay"]): [p.shape for p in g["params"]] for g in opt.param_groups}
    assert groups == {(5e-4, 0.1): [(2, 2)], (5e-4, 0.0): [(2,)], (2e-3, 0.1): [(2, 2)]}


def test_a_rate_switch_changes_one_groups_peak_rate_from_its_step_and_survives_a_resume() -> None:
    from deltatune.config import load_config
    from deltatune.methods.base import RateSwitch
    from deltatune.training.optim import build_optimizer, build_scheduler, lr_factor

    cfg = load_config(None, ["train.warmup=2", "train.schedule=linear"]).train
    params = {"a": torch.nn.Parameter(torch.zeros(2, 2)), "b": torch.nn.Parameter(torch.zeros(2, 2))}

    def build() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        opt = build_optimizer(params, cfg, 1e-3, switch_of={"b": RateSwitch(at_step=5, rate=4e-2)})
        return opt, build_scheduler(opt, cfg, 10)

    opt, sched = build()
    seen = []
    for _ in range(10):
        seen.append({id(g["params"][0]): g["lr"] for g in opt.param_groups})
        opt.step()
        sched.step()
        if len(seen) == 6:  # checkpoint after step 6, resume into a fresh optimizer and schedule
            state = (opt.state_dict(), sched.state_dict())
            opt, sched = build()
            opt.load_state_dict(state[0])
            sched.load_state_dict(state[1])
    for step, rates in enumerate(seen):
        curve = lr_factor(step, 10, 2, "linear")
        assert rates[id(params["a"])] == pytest.approx(1e-3 * curve)
        assert rates[id(params["b"])] == pytest.approx((4e-2 if step >= 5 else 1e-3) * curve)


def test_diff_pruning_gates_train_at_their_own_rate_and_freeze_after_pruning(tiny_llama_dir: Path) -> None:
    import deltatune as dt
    from deltatune.config import ModelConfig
    from deltatune.methods.sparse import DiffLinear

    model = dt.load_model(ModelConfig(name=str(tiny_llama_dir), device="cpu"), task="causal_lm").model
    method = dt.attach(model, {"name": "diff_pruning", "sparsity": 0.9, "gate_lr": 0.05, "prune_at": 0.5})
    rates = method.learning_rates(model, 1e-4)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, DiffLinear)}
    assert set(rates) == {f"{n}.log_alpha" for n in layers} and set(rates.values()) == {0.05}
    method.after_step(model, 2, 10)  # before prune_at: nothing happens
    assert all(m.mask is None for m in layers.values()) and method.regularization(model) is not None
    with torch.no_grad():
        for m in layers.values():
            m.diff.normal_()
    method.after_step(model, 4, 10)  # the 5th of 10 steps: pruned, gates frozen open, no more L0 term
    kept = sum(int(m.mask.sum()) for m in layers.values())
    assert kept == round(0.1 * sum(m.diff.numel() for m in layers.values()))
    assert all(not m.log_alpha.requires_grad for m in layers.values()) and method.regularization(model) is None
    with torch.no_grad():  # an optimizer moving pruned entries changes nothing: the next step re-zeroes them
        for m in layers.values():
            m.diff.add_(1.0)
    method.after_step(model, 5, 10)
    assert sum(int(m.diff.count_nonzero()) for m in layers.values()) <= kept
    # the kept entries train at fixed_mask_lr_scale x the run's rate from the first step after pruning
    switches = method.rate_switches(model, 1e-4, 10)
    assert set(switches) == {f"{n}.diff" for n in layers}
    assert {s.at_step for s in switches.values()} == {5}
    assert all(s.rate == pytest.approx(1e-4 * 50) for s in switches.values())
    assert method.rate_switches(model, 1e-4, 1) == {}  # pruned only at the end: no fixed-mask phase


def test_prompt_methods_keep_the_block_mask() -> None:
    from deltatune.config import config_from_dict
    from deltatune.methods import build_method

    def method(section: object) -> bool:
        return build_method(config_from_dict({"method": section}).method).packed_attention

    assert method({"name": "lora"}) and method([{"name": "lora"}, {"name": "bitfit"}])
    assert not method({"name": "prefix_tuning"}) and not method([{"name": "lora"}, {"name": "prompt_tuning"}])


def test_passes_capped_by_tokens_give_the_same_update(tiny_llama_dir: Path, tmp_path: Path) -> None:
    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    common = ("train.max_steps=2", "data.eval=null", "train.lr=1e-3", "train.batch_size=8")
    one, capped = tmp_path / "one", tmp_path / "capped"
    assert main(train_args(tiny_llama_dir, data, one, *common, "train.pass_tokens=null")) == 0
    assert main(train_args(tiny_llama_dir, data, capped, *common, "train.pass_tokens=40")) == 0  # ~2 examples
    a, b = load_file(one / "adapter_model.safetensors"), load_file(capped / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)  # float summation order only
    assert [m["tokens"] for m in metrics(one)] == [m["tokens"] for m in metrics(capped)]
    assert [m["loss"] for m in metrics(one)] == pytest.approx([m["loss"] for m in metrics(capped)], rel=1e-6)


def test_the_model_card_names_peft_only_for_deltas_peft_loads(tiny_llama_dir: Path, tmp_path: Path) -> None:
    data = write_chat_data(tmp_path / "d.jsonl", n=8)
    for method, loader in (("lora", "library_name: peft"), ("bitfit", "library_name: deltatune")):
        out = tmp_path / method
        args = [a for a in train_args(tiny_llama_dir, data, out, "train.max_steps=1", "data.eval=null",
                                      f"method.name={method}") if method == "lora" or a != "method.r=4"]
        assert main(args) == 0
        card = (out / "README.md").read_text()
        assert loader in card
        assert ("PeftModel.from_pretrained" in card) == (method == "lora")


@pytest.mark.slow
def test_ctrl_c_at_any_moment_leaves_a_checkpoint_that_resumes_to_the_uninterrupted_result(
        tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A real SIGINT (``_thread.interrupt_main``) at points spread over many steps, wherever the loop is (inside
    a step, between the optimizer step and the counters, in a callback): each run stops with a checkpoint and
    resumes to the very delta an uninterrupted run writes."""
    import _thread
    import threading
    import time

    import deltatune as dt
    from deltatune.errors import DeltatuneError

    data = write_chat_data(tmp_path / "d.jsonl")

    def cfg(out: Path) -> object:
        return dt.load_config(None, [f"model.name={tiny_llama_dir}", f"data.train={data}", "data.eval=null",
                                     "method.r=4", "train.batch_size=4", "train.max_steps=12", "train.lr=1e-3",
                                     f"output.dir={out}"])

    class StepClock(dt.Callback):
        def on_train_start(self, run: object) -> None:
            self.started = time.perf_counter()

        def on_fit_end(self, run: object) -> None:
            self.seconds = time.perf_counter() - self.started

    clock = StepClock()
    dt.train(cfg(tmp_path / "straight"), progress=False, callbacks=[clock])
    want = load_file(tmp_path / "straight" / "adapter_model.safetensors")

    class CtrlCAfter(dt.Callback):  # a signal at ``delay`` into the loop, none once the loop has ended
        def __init__(self, delay: float) -> None:
            self.delay, self.ended = delay, False

        def fire(self) -> None:
            if not self.ended:
                _thread.interrupt_main()

        def on_train_start(self, run: object) -> None:
            threading.Timer(self.delay, self.fire).start()

        def on_fit_end(self, run: object) -> None:
            self.ended = True

    interrupted = 0
    for k, share in enumerate((0.13, 0.29, 0.46, 0.61, 0.83)):  # of the loop's duration: different points
        out = tmp_path / f"run{k}"
        try:
            dt.train(cfg(out), progress=False, callbacks=[CtrlCAfter(share * clock.seconds)])
        except DeltatuneError as err:
            assert "interrupted at step" in str(err) and "checkpoint written" in str(err)
            interrupted += 1
            dt.train(cfg(out), resume=True, progress=False)
        got = load_file(out / "adapter_model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want), k
    assert interrupted >= 3  # the signals did land inside the loop
