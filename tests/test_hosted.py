"""Hosted fine-tuning without a server: conversion of every format, validation with lines, estimates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune import hosted
from deltatune.data import load_examples
from deltatune.errors import DataError
from deltatune.hosted import tokens

RECORDS = {
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello", "weight": 0},
                              {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]},
    "alpaca": {"instruction": "Add", "input": "1 2", "output": "3", "system": "Be brief."},
    "sharegpt": {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"},
                                                          {"from": "gpt", "value": "Hello"}]},
    "prompt_completion": {"prompt": "Hi", "completion": "Hello"},
    "classification": {"text": "great film", "label": "positive"},
}


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(autouse=True)
def _offline_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: tiktoken cannot fetch its BPE files, so the approximation is used unless a test says."""
    def unavailable(model: str):
        raise ConnectionError("offline")

    monkeypatch.setattr(tokens, "_load_tiktoken", unavailable)
    monkeypatch.setattr(tokens, "_ENCODINGS", {})


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_every_chat_format_converts_to_both_providers(fmt: str, tmp_path: Path) -> None:
    [example] = load_examples(write(tmp_path / "d.jsonl", [RECORDS[fmt]]))
    openai_row = hosted.to_openai(example)
    vertex_row = hosted.to_vertex(example)
    roles = [m["role"] for m in openai_row["messages"]]
    assert roles[-1] == "assistant" and set(roles) <= {"system", "user", "assistant"}
    assert vertex_row["contents"][0]["role"] == "user" and vertex_row["contents"][-1]["role"] == "model"
    assert all(set(c) == {"role", "parts"} and c["parts"][0]["text"] for c in vertex_row["contents"])
    has_system = roles[0] == "system"
    assert ("systemInstruction" in vertex_row) == has_system
    if has_system:
        assert vertex_row["systemInstruction"]["parts"] == [{"text": "Be brief."}]
    assert len(vertex_row["contents"]) == len(roles) - has_system


def test_classification_and_weights(tmp_path: Path) -> None:
    [cls] = load_examples(write(tmp_path / "c.jsonl", [RECORDS["classification"]]))
    assert hosted.to_openai(cls)["messages"] == [{"role": "user", "content": "great film"},
                                                 {"role": "assistant", "content": "positive"}]
    [chat] = load_examples(write(tmp_path / "m.jsonl", [RECORDS["messages"]]))
    assert hosted.to_openai(chat)["messages"][2] == {"role": "assistant", "content": "Hello", "weight": 0}
    # Vertex has no weight: the weight-0 turn stays as an ordinary model turn
    assert hosted.to_vertex(chat)["contents"][1] == {"role": "model", "parts": [{"text": "Hello"}]}


def test_text_format_is_rejected_clearly(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", [{"text": "just text"}] * 12)
    report = hosted.check(path, "openai")
    assert not report.ok and f"{path}:1: plain-text examples have no assistant turn" in report.errors[0]


def test_validation_reports_every_bad_line(tmp_path: Path) -> None:
    good = RECORDS["messages"]
    rows = [good] * 12
    rows[2] = {"messages": [{"role": "user", "content": "Hi"}]}                                # no assistant
    rows[4] = {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}  # empty
    rows[6] = {"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "x"}]}
    rows[8] = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 2}]}
    rows[10] = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b" * 300_000}]}
    path = write(tmp_path / "bad.jsonl", rows)
    errors = hosted.check(path, "openai", model="gpt-3.5-turbo").errors
    assert [e.split(":")[1] for e in errors] == ["3", "5", "7", "9", "11"]
    assert "no assistant message" in errors[0] and "is empty" in errors[1] and "unknown role" in errors[2]
    assert "weight must be 0 or 1" in errors[3]
    assert "over the 16,385-token training context" in errors[4] and "(approximate)" in errors[4]
    with pytest.raises(DataError, match="5 problem"):
        hosted.check(path, "openai").raise_for_errors(path)


def test_vertex_rules_and_warnings(tmp_path: Path) -> None:
    tail_user = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                              {"role": "user", "content": "c"}]}
    mid_system = {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                               {"role": "assistant", "content": "b"}]}
    path = write(tmp_path / "v.jsonl", [RECORDS["messages"]] * 16 + [tail_user, mid_system])
    report = hosted.check(path, "vertex")
    assert any(":17: the last turn must be an assistant" in e for e in report.errors)
    assert any(":18: messages[1]: a system message inside" in e for e in report.errors)
    assert any("weight-0 assistant turns" in w and "trained on" in w for w in report.warnings)
    assert any("recommends at least 100" in w for w in report.warnings)


def test_minimum_count_and_no_system_warning(tmp_path: Path) -> None:
    path = write(tmp_path / "few.jsonl", [RECORDS["prompt_completion"]] * 5)
    report = hosted.check(path, "openai")
    assert report.errors == ["5 training examples; openai requires at least 10"]
    assert any("have no system message" in w for w in report.warnings)
    assert hosted.check(path, "openai", role="validation").ok


def test_prepare_writes_provider_jsonl(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", [RECORDS["alpaca"]] * 20)
    out = tmp_path / "out" / "a.vertex.jsonl"
    report = hosted.prepare(path, "vertex", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert report.ok and len(rows) == 20
    assert rows[0] == {"systemInstruction": {"role": "system", "parts": [{"text": "Be brief."}]},
                       "contents": [{"role": "user", "parts": [{"text": "Add\n\n1 2"}]},
                                    {"role": "model", "parts": [{"text": "3"}]}]}


def test_default_epochs_follow_openai_heuristic() -> None:
    assert [tokens.default_epochs(n) for n in (10, 20, 34, 100, 8000, 9000, 50_000)] == [10, 5, 3, 3, 3, 2, 1]
    assert tokens.default_epochs(2) == 25


def test_estimate_approximate_fallback(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", [{"prompt": "abcd" * 5, "completion": "wxyz" * 3}] * 20)
    est = hosted.estimate(path, "openai", "gpt-4o-mini-2024-07-18", price_per_million=3.0)
    # per example: 3 priming + (3 + ceil(4/4) + 5) user + (3 + ceil(9/4) + 3) assistant = 3 + 9 + 9 = 21
    assert not est.exact and est.per_example == [21] * 20 and est.tokens == 420
    assert est.epochs == 5 and est.billed_tokens == 2100
    assert est.price == pytest.approx(2100 / 1e6 * 3.0)
    text = "\n".join(est.lines())
    assert "approximate" in text and "price" in text
    assert hosted.estimate(path, "openai", "gpt-4o-mini", epochs=2).billed_tokens == 840
    vertex = hosted.estimate(path, "vertex", "gemini-2.5-flash")
    assert vertex.billed_tokens is None and "pass --epochs" in vertex.epochs_source


def test_estimate_uses_tiktoken_when_it_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = []

    def fake_encoding(model: str):
        seen.append(model)
        return lambda text: len(text.split()) or 1

    monkeypatch.setattr(tokens, "_load_tiktoken", fake_encoding)
    path = write(tmp_path / "p.jsonl", [{"prompt": "one two three", "completion": "four"}] * 10)
    est = hosted.estimate(path, "openai", "ft:gpt-4o-mini-2024-07-18:org::abc")
    assert est.exact and seen == ["gpt-4o-mini-2024-07-18"]
    assert est.per_example[0] == 3 + (3 + 1 + 3) + (3 + 1 + 1)
    assert "approximate" not in "\n".join(est.lines())
