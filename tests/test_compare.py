"""`deltatune compare` end to end on tiny random models: one process per method, report.md, results.json,
charts, failures, skipping finished methods, resuming, per-method overrides and clear config errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import deltatune.compare.runner as runner
from deltatune.cli import main
from deltatune.compare.plan import load_plan
from deltatune.config import dump_config
from deltatune.errors import ConfigError

PNG = b"\x89PNG\r\n\x1a\n"
COLORS = {"apple": "red", "lime": "green", "sky": "blue", "coal": "black"}
# tiny Llama (hidden 64, kv 32, ffn 128, 2 layers): LoRA r=2 on all 7 linear layers of a block is
# r * (in + out) = 2 * (128 + 96 + 96 + 128 + 192 + 192 + 192) = 2048 per block
LORA_R2_LLAMA = 2 * 2048
IA3_LLAMA = 2 * (32 + 32 + 128)  # k and v outputs, down_proj input, per block


def chat_data(path: Path, n: int = 16) -> Path:
    things = list(COLORS)
    rows = [{"messages": [{"role": "user", "content": f"What colour is {things[i % 4]} number {i}?"},
                          {"role": "assistant", "content": COLORS[things[i % 4]]}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def classification_data(path: Path, n: int = 16) -> Path:
    rows = ["sentence\tlabel"] + [f"{('great', 'awful')[i % 2]} movie {i}\t{1 - i % 2}" for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


def write_yaml(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def rows_of(report: str) -> dict[str, list[str]]:
    """The table rows of report.md by method: the cells after the method name."""
    lines = [ln for ln in report.splitlines() if ln.startswith("| ") and not ln.startswith(("| method", "| ---"))]
    return {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in lines}


def header_of(report: str) -> list[str]:
    line = next(ln for ln in report.splitlines() if ln.startswith("| method"))
    return [c.strip() for c in line.split("|")[2:-1]]


def llama_file(tmp_path: Path, model: Path, **compare: object) -> Path:
    tree = {"model": {"name": str(model)},
            "data": {"train": str(chat_data(tmp_path / "chat.jsonl")), "eval": 0.25},
            "train": {"max_steps": 3, "batch_size": 4, "eval_generations": 4},
            "output": {"dir": str(tmp_path / "cmp")},
            "compare": {"latency_tokens": 4, "latency_repeats": 1, **compare}}
    return write_yaml(tmp_path / "run.yaml", tree)


def test_compare_llama_report_failure_skip_and_resume(tiny_llama_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run_yaml = llama_file(tmp_path, tiny_llama_dir, methods=["lora", "ia3", "freeze"],
                          overrides={"lora": {"method": {"r": 2}},
                                     "freeze": {"method": {"layers": 9}}})  # valid config, refused at attach
    out = tmp_path / "cmp"
    assert main(["compare", str(run_yaml)]) == 0
    printed = capsys.readouterr()
    assert "[1/3] lora: training" in printed.out and re.search(r"\[1/3\] lora: done in \d+s, ETA ~\d+", printed.out)
    assert re.search(r"\[3/3\] freeze: failed after \d+s: method.layers: 9 but the model has 2 blocks", printed.out)
    assert "failed: freeze" in printed.err

    report = (out / "report.md").read_text()
    rows, header = rows_of(report), header_of(report)
    assert list(rows) == ["lora", "ia3", "freeze"]
    col = {name: i for i, name in enumerate(header)}
    assert rows["lora"][col["trainable"]] == f"{LORA_R2_LLAMA:,}"  # the per-method override reached lora
    assert rows["ia3"][col["trainable"]] == f"**{IA3_LLAMA:,}**"  # the fewest: bold
    assert rows["ia3"][col["%"]].startswith("**") and not rows["lora"][col["%"]].startswith("**")
    assert rows["lora"][col["can merge"]] == rows["ia3"][col["can merge"]] == "yes"
    assert "exact match" in header and rows["lora"][col["exact match"]].strip("*").endswith("%")
    assert rows["freeze"][0] == "failed: method.layers: 9 but the model has 2 blocks"
    assert f"- fewest trainable parameters: ia3 ({IA3_LLAMA:,}" in report
    assert "- failed: freeze (method.layers: 9" in report and "same examples in the same order" in report
    assert rows["ia3"][col["delta size"]].startswith("**") and not rows["lora"][col["delta size"]].startswith("**")
    # a best in every ranked column
    for ranked in ("eval loss", "tokens/s", "s/step", "peak RSS MB", "latency ms/token"):
        assert any(rows[m][col[ranked]].startswith("**") for m in ("lora", "ia3")), ranked
    for unranked in ("lr", "steps", "can merge"):
        assert not any(rows[m][col[unranked]].startswith("**") for m in ("lora", "ia3")), unranked

    results = json.loads((out / "results.json").read_text())
    assert results["versions"]["deltatune"] and results["date"] and results["run"]["seed"] == 42
    by_method = {r["method"]: r for r in results["methods"]}
    assert by_method["freeze"]["status"] == "failed" and "trainable_params" not in by_method["freeze"]
    for name in ("lora", "ia3"):
        r = by_method[name]
        files = (out / name / "adapter_model.safetensors", out / name / "adapter_config.json")
        assert r["status"] == "finished" and r["delta_bytes"] == sum(f.stat().st_size for f in files)
        assert r["steps"] == 3 and r["train_tokens"] > 0 and r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 100
        assert [s for s, _ in r["eval_curve"]] == [0, 1, 2, 3]  # eval_every set for ~8 points of 3 steps
        assert r["metric"] == "exact_match" and r["exact_match"]["n"] == 4
        assert r["latency"]["unit"] == "ms per generated token" and r["latency"]["merged_ms"] > 0
        assert r["config"]["train"]["lr"] is None  # each method at its recommended rate
    assert by_method["lora"]["trainable_params"] == LORA_R2_LLAMA
    fastest = min(("lora", "ia3"), key=lambda m: min(by_method[m]["latency"]["unmerged_ms"],
                                                    by_method[m]["latency"]["merged_ms"]))
    quickest = max(("lora", "ia3"), key=lambda m: by_method[m]["tokens_per_s"])
    for criterion, best in (("fastest inference", fastest), ("fastest training", quickest)):
        line = next(ln for ln in report.splitlines() if ln.startswith(f"- {criterion}: "))
        named = line.removeprefix(f"- {criterion}: ").split(" (")[0].replace(" and ", ", ").split(", ")
        assert best in named, line  # ties at the printed precision name every tied method
    assert by_method["lora"]["lr"] == 2e-4 and by_method["ia3"]["lr"] == 3e-3
    for png in ("eval_loss.png", "metric_vs_params.png", "memory.png", "speed.png"):
        assert (out / png).read_bytes()[:8] == PNG and f"]({png})" in report

    # again (without the failing method): ia3 is skipped without retraining; lora lost its compare.json (as
    # if interrupted while measuring) and resumes from its final checkpoint
    ia3_mtime = (out / "ia3" / "compare.json").stat().st_mtime_ns
    (out / "lora" / "compare.json").unlink()
    assert main(["compare", str(run_yaml), "--methods", "lora,ia3"]) == 0
    printed = capsys.readouterr().out
    assert "[2/2] ia3: skipped (finished in an earlier run" in printed
    assert "[1/2] lora: resuming from its checkpoint" in printed and "[1/2] lora: done" in printed
    assert (out / "ia3" / "compare.json").stat().st_mtime_ns == ia3_mtime
    lora = json.loads((out / "lora" / "compare.json").read_text())
    assert lora["resumed"] and lora["steps"] == 3 and lora["train_tokens"] == 0  # no step was trained again
    assert lora["tokens_per_s"] is None and lora["trainable_params"] == LORA_R2_LLAMA
    report = (out / "report.md").read_text()
    assert list(rows_of(report)) == ["lora", "ia3"] and "resumed after an interruption: lora" in report
    assert rows_of(report)["lora"][header_of(report).index("s/step")] == "-"  # its loop trained no step

    # a method whose default rate changed since (it lives in the code, not in the config) trains again
    record = json.loads((out / "ia3" / "compare.json").read_text())
    (out / "ia3" / "compare.json").write_text(json.dumps({**record, "lr": 1e-2}))
    assert main(["compare", str(run_yaml), "--methods", "ia3"]) == 0
    assert "[1/1] ia3: training again (its settings changed since the earlier run), lr 0.003" in capsys.readouterr().out
    assert json.loads((out / "ia3" / "compare.json").read_text())["lr"] == 3e-3


def test_compare_classifier_methods_flag_time_budget_and_overrides(tiny_bert_dir: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    tree = {"model": {"name": str(tiny_bert_dir)},
            "data": {"train": str(classification_data(tmp_path / "cls.tsv")), "eval": 0.25},
            "train": {"max_steps": 50, "batch_size": 4},
            "compare": {"methods": ["full"], "max_seconds": 1e-3, "latency_repeats": 1,
                        "overrides": {"bitfit": {"train": {"lr": 0.02}}}}}
    run_yaml = write_yaml(tmp_path / "run.yaml", tree)
    out = tmp_path / "elsewhere"
    assert main(["compare", str(run_yaml), "--methods", "bitfit,prompt_tuning", "-o", str(out),
                 "compare.overrides.prompt_tuning.method.num_virtual_tokens=3"]) == 0
    printed = capsys.readouterr().out
    assert "comparing 2 methods (bitfit, prompt_tuning)" in printed  # --methods wins over the file
    results = json.loads((out / "results.json").read_text())
    by_method = {r["method"]: r for r in results["methods"]}
    assert set(by_method) == {"bitfit", "prompt_tuning"}
    bitfit, prompt = by_method["bitfit"], by_method["prompt_tuning"]
    assert bitfit["lr"] == 0.02 and prompt["lr"] == 0.3  # the override, and prompt tuning's classifier rate
    assert bitfit["steps"] == prompt["steps"] == 1  # the time budget stopped both after their first step
    assert prompt["trainable_params"] == 3 * 32 + 32 * 2 + 2  # 3 virtual tokens + the fresh 2-label head
    assert bitfit["metric"] == "accuracy" and 0 <= bitfit["metric_value"] <= 1
    assert bitfit["latency"]["unit"] == "ms per input token"
    assert bitfit["latency"]["can_merge"] == "yes" and prompt["latency"]["can_merge"] == "no"
    report = (out / "report.md").read_text()
    rows, header = rows_of(report), header_of(report)
    col = {name: i for i, name in enumerate(header)}
    assert "accuracy" in header and "exact match" not in header
    assert rows["prompt_tuning"][col["merged ms/token"]] == "-" and rows["prompt_tuning"][col["can merge"]] == "no"
    assert rows["prompt_tuning"][col["trainable"]].startswith("**")
    assert "stopped by the time budget before the planned steps: bitfit (1 of 50), prompt_tuning (1 of 50)" in report
    assert rows["prompt_tuning"][col["lr"]] == f"0.3 (head {prompt['head_lr']:g})"
    assert rows["bitfit"][col["lr"]] == "0.02 (head 0.02)"  # an explicit train.lr also drives the head


def test_compare_config_errors_name_the_key(tiny_llama_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    def error_of(*argv: str, **compare: object) -> str:
        run_yaml = llama_file(tmp_path, tiny_llama_dir, **compare)
        assert main(["compare", str(run_yaml), *argv]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err

    assert "compare.methds: unknown key (the compare section takes methods, max_seconds" in error_of(methds=["lora"])
    assert "compare.overrides: Value error" not in error_of(overrides={"lora": {"data": {"eval": 0.1}}})
    assert "lora.data: not allowed here (every method trains on the same data)" in \
        error_of(overrides={"lora": {"data": {"eval": 0.1}}})
    assert "(method lora, with compare.overrides.lora): method.rr: unknown key" in \
        error_of(methods=["lora"], overrides={"lora": {"method": {"rr": 3}}})
    assert "compare.overrides.lorra: unknown method" in error_of(overrides={"lorra": {"method": {"r": 2}}})
    assert "compare: unknown method 'nope'" in error_of("--methods", "lora,nope")
    assert "compare.max_seconds: Input should be greater than 0" in error_of(max_seconds=0)
    assert "compare.latency_tokens" in error_of("compare.latency_tokens=0")
    assert not (tmp_path / "cmp").exists()  # nothing ran


def test_plan_learning_rates_aliases_notes_and_all(tiny_llama_dir: Path, tmp_path: Path) -> None:
    run_yaml = llama_file(tmp_path, tiny_llama_dir)
    plan = load_plan(run_yaml, ["method.name=lora", "method.r=16", "train.lr=1e-3"], methods=["lora", "dora", "ia3"])
    by_key = {m.key: m for m in plan.methods}
    assert by_key["lora"].config.method.r == 16  # the file's method section configures lora only
    assert by_key["dora"].config.method.name == "lora" and by_key["dora"].config.method.use_dora
    assert by_key["dora"].config.method.r == 8
    assert {m.lr for m in plan.methods} == {1e-3}  # a global train.lr applies to every method, with a note
    assert any("train.lr=1e-3 in" in n and "applies to every method" in n for n in plan.notes)
    assert {m.config.output.dir for m in plan.methods} == {str(tmp_path / "cmp" / k) for k in by_key}
    # what a rerun does with a method: skip it (same settings finished), resume it (a checkpoint of the same
    # settings), or train it again (nothing, or other settings)
    ia3 = by_key["ia3"]
    assert runner.how_to_start(ia3, fresh=False) == "fresh"
    ia3.out.mkdir(parents=True)
    (ia3.out / "compare.json").write_text(json.dumps({"config": ia3.config_json(), "lr": ia3.lr, "head_lr": None}))
    assert runner.how_to_start(ia3, fresh=False) == "skip" and runner.how_to_start(ia3, fresh=True) == "fresh"
    (ia3.out / "compare.json").write_text(json.dumps({"config": {**ia3.config_json(), "model": {}}}))
    assert runner.how_to_start(ia3, fresh=False) == "fresh"
    (ia3.out / "run.yaml").write_text(dump_config(ia3.config))
    (ia3.out / "checkpoints" / "step-000002").mkdir(parents=True)
    (ia3.out / "checkpoints" / "step-000002" / "state.json").write_text("{}")
    # a finished run of other settings (its compare.json) with its final checkpoint: train again, not resume
    assert runner.how_to_start(ia3, fresh=False) == "fresh"
    (ia3.out / "compare.json").unlink()  # a run deletes it when it starts: this checkpoint is an interrupted run's
    assert runner.how_to_start(ia3, fresh=False) == "resume"
    (ia3.out / "run.yaml").write_text(dump_config(by_key["lora"].config))
    assert runner.how_to_start(ia3, fresh=False) == "fresh"

    everything = [m.key for m in load_plan(run_yaml, methods=["all"]).methods]
    assert "compose" not in everything and {"full", "lora", "dora", "ia3", "prefix_tuning"} <= set(everything)
    assert everything[0] == "full"
    with pytest.raises(ConfigError, match="listed twice"):
        load_plan(run_yaml, methods=["lora", "lora"])
    with pytest.raises(ConfigError, match=r"data\.train: compare needs training data"):
        load_plan(None, [f"model.name={tiny_llama_dir}"], methods=["lora"])


def test_ctrl_c_while_waiting_says_how_to_continue(tiny_llama_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(*args: object, **kwargs: object) -> tuple[int, str | None]:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_child", interrupted)
    assert main(["compare", str(llama_file(tmp_path, tiny_llama_dir, methods=["ia3"]))]) == 130
    err = capsys.readouterr().err
    assert "interrupted while ia3 was running" in err and "Run the same command again to continue" in err


@pytest.mark.slow
def test_real_ctrl_c_checkpoints_and_the_rerun_resumes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    run_yaml = llama_file(tmp_path, tiny_llama_dir, methods=["lora"])
    argv = [sys.executable, "-m", "deltatune", "compare", str(run_yaml), "train.max_steps=400"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a shell that starts jobs in the background leaves SIGINT ignored, which the child would inherit
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = tmp_path / "cmp" / "lora" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sum(1 for ln in (metrics.read_text().splitlines()
                                                           if metrics.exists() else []) if '"loss"' in ln) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Run the same command again" in err
    assert list((tmp_path / "cmp" / "lora" / "checkpoints").glob("step-*"))
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and "lora: resuming from its checkpoint" in done.stdout
    steps = [json.loads(ln)["step"] for ln in metrics.read_text().splitlines() if '"loss"' in ln]
    assert steps == list(range(1, 401))
