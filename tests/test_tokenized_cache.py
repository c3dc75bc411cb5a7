"""The run's data is tokenized once: the tokenized splits are cached by content (data, tokenizer, settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import deltatune as dt
from tests.test_train import write_chat_data


def test_the_data_is_tokenized_once_and_found_again(tiny_llama_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokenizing is cached by content: a second run on the same data, tokenizer and settings (a compare's next
    method, a --resume) reads the first one's result; other settings or changed data tokenize anew."""
    import deltatune.data.tokenize as tokenize_module
    from deltatune.data import load_examples
    from deltatune.training.setup import RunData, tokenize_run_data

    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    calls = {"n": 0}
    real = tokenize_module.tokenize_examples

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr("deltatune.training.setup.tokenize_examples", counting)
    loaded = dt.load_model(dt.ModelConfig(name=str(tiny_llama_dir), device="cpu"))
    path = write_chat_data(tmp_path / "d.jsonl", n=12)
    examples = load_examples(str(path))
    data = RunData(train=examples[:9], eval=examples[9:], task="causal_lm", label2id=None, train_path=str(path),
                   is_demo=False)
    cfg = dt.load_config(None, [f"data.train={path}"])
    first = tokenize_run_data(cfg, data, loaded.tokenizer)
    assert calls["n"] == 2  # train and eval
    again = tokenize_run_data(cfg, data, loaded.tokenizer)
    assert calls["n"] == 2 and again[0] == first[0] and again[1] == first[1]
    assert again[2].summary() == first[2].summary()
    tokenize_run_data(dt.load_config(None, [f"data.train={path}", "data.max_length=64"]), data, loaded.tokenizer)
    assert calls["n"] == 4  # other settings: tokenized anew
    data.train[0].messages[-1].content += " (changed)"
    tokenize_run_data(cfg, data, loaded.tokenizer)
    assert calls["n"] == 6  # changed data: tokenized anew
