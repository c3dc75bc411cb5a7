"""Tokenize a run's data once: the tokenized splits cached under ``$DELTATUNE_CACHE/tokenized/``.

    train, evals, report = cached_tokenization(key_parts, compute)

The key is a SHA-256 over everything the result depends on: the examples as read (text, roles, labels, origins),
the tokenizer (class, vocabulary and merges, special tokens, chat template), the settings (task, max_length,
truncation, train_on_prompt, label map) and the source of deltatune's tokenization code. So `deltatune compare`
tokenizes a file once for all its methods (each method's process finds the parent's result), and `train
--resume` finds its first run's. A damaged or unreadable entry is computed again; entries are only ever added.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltatune.data.tokenize import TokenizedExample, TokenizeReport
from deltatune.files import write_atomic
from deltatune.models import cache_dir

Split = list[TokenizedExample]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of what a tokenizer does to text: its class, vocabulary and merges (the fast tokenizer's JSON),
    special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [type(tokenizer).__name__, body, json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
             str(getattr(tokenizer, "chat_template", None))]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def cache_key(examples: dict[str, list[Any]], tokenizer: Any, settings: dict[str, Any]) -> str:
    """The cache key of tokenizing ``examples`` ({split: Examples}) with ``tokenizer`` and ``settings``."""
    from deltatune.data import chat, tokenize, tools

    code = b"".join(Path(m.__file__).read_bytes() for m in (tokenize, chat, tools) if m.__file__)
    digest = hashlib.sha256(code)
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for split, items in examples.items():
        digest.update(split.encode())
        for example in items:
            digest.update(json.dumps(dataclasses.asdict(example), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cached_tokenization(key: str, compute: Callable[[], tuple[Split, Split, TokenizeReport]]
                        ) -> tuple[Split, Split, TokenizeReport, bool]:
    """Return (train, eval, report, found): from the cache when ``key`` is there, else from ``compute()``, then
    stored."""
    path = cache_dir() / "tokenized" / f"{key}.json"
    try:
        stored = json.loads(path.read_text())
        train = [TokenizedExample(**e) for e in stored["train"]]
        evals = [TokenizedExample(**e) for e in stored["eval"]]
        return train, evals, TokenizeReport(**stored["report"]), True
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not cached yet, or an entry that does not read: compute it
    train, evals, report = compute()
    text = json.dumps({"train": [dataclasses.asdict(e) for e in train], "eval": [dataclasses.asdict(e) for e in evals],
                       "report": dataclasses.asdict(report)})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: tmp.write_text(text))
    except OSError:
        pass  # a read-only cache: the run goes on without storing
    return train, evals, report, False
