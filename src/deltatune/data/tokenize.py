"""Tokenize examples into input ids and loss labels, applying the length policy.

    tokenized, report = tokenize_examples(examples, tokenizer, task="causal_lm", max_length=512,
                                          truncation="drop")
    print(report.summary())

Causal LM: ``labels`` are aligned with ``input_ids`` (not shifted; the train loop shifts) and hold
``-100`` where there is no loss. Chat examples get the loss on assistant turns only (see ``data.chat``);
text examples on every token (text + eos). Classification: ``label`` is the class id, ``labels`` is [].
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from deltatune.data.chat import ChatRenderer, Span
from deltatune.data.formats import Example
from deltatune.errors import DataError

IGNORE_INDEX = -100
TASKS = ("causal_lm", "classification")
TRUNCATIONS = ("drop", "truncate", "error")
_INT_LIKE = re.compile(r"-?\d+")


@dataclass
class TokenizedExample:
    """Token ids of one example, its loss labels (causal LM) or class id (classification)."""

    input_ids: list[int]
    labels: list[int]
    origin: str
    label: int | None = None
    token_type_ids: list[int] | None = None


@dataclass
class TokenizeReport:
    """Counts from one tokenize_examples call; ``dropped`` gives the count per reason.

    ``n_supervised_tokens`` counts the positions with a loss after the train loop's shift
    (``labels[1:] != -100``); for classification it is the number of kept examples (one label each).
    """

    n_in: int = 0
    n_kept: int = 0
    n_dropped: int = 0
    n_truncated: int = 0
    n_tokens: int = 0
    n_supervised_tokens: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    task: str = "causal_lm"

    def drop(self, reason: str) -> None:
        """Count one dropped example under ``reason``."""
        self.n_dropped += 1
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def summary(self) -> str:
        """Return a one-line summary, e.g. ``999 examples: kept 990, dropped 9 (longer than ...)``."""
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items()))
        dropped = f"dropped {self.n_dropped}" + (f" ({reasons})" if reasons else "")
        share = self.n_supervised_tokens / self.n_tokens if self.n_tokens else 0.0
        loss = (f"{self.n_supervised_tokens:,} with loss ({share:.0%})" if self.task != "classification"
                else "one label per example")
        if self.task == "preference":
            loss += ", each prompt once"
        kind = "pairs" if self.task == "preference" else "examples"
        return (f"{self.n_in} {kind}: kept {self.n_kept}, {dropped}, truncated {self.n_truncated}; "
                f"{self.n_tokens:,} tokens, {loss}")


def label_key(label: int | str) -> str:
    """The label-map key of a label as read: ``1`` and ``"1"`` both give ``"1"``."""
    return str(label).strip()


def build_label_map(examples: Sequence[Example]) -> dict[str, int]:
    """Map each distinct label to a class id; returns ``{label_key: id}``.

    Integer labels (or integer strings, as CSV/TSV give them) that are exactly 0..K-1 map to themselves;
    other integers are numbered in numeric order, other strings in sorted order.
    """
    keys = {label_key(e.label) for e in examples if e.label is not None}
    if not keys:
        raise DataError("no labels in the data: classification needs a `label` field in every example")
    if all(_INT_LIKE.fullmatch(k) for k in keys):
        ordered = sorted(keys, key=int)
        if [int(k) for k in ordered] == list(range(len(ordered))):
            return {k: int(k) for k in ordered}
        return {k: i for i, k in enumerate(ordered)}
    return {k: i for i, k in enumerate(sorted(keys))}


def _class_id(example: Example, label2id: dict[str, int] | None) -> int:
    label = example.label
    if label is None:
        raise DataError(f"{example.origin}: no label; classification needs a label on every example")
    if label2id is not None:
        key = label_key(label)
        if key not in label2id:
            raise DataError(f"{example.origin}: unknown label {label!r}; known labels are "
                            f"{sorted(label2id)}; fix the label or add examples of it to the training data")
        return label2id[key]
    if isinstance(label, int) or _INT_LIKE.fullmatch(label.strip()):
        value = int(label)
        if value < 0:
            raise DataError(f"{example.origin}: label {label!r} is negative; use ids 0..K-1 or names")
        return value
    raise DataError(f"{example.origin}: label {label!r} is not a number; pass label2id (build_label_map) "
                    "to map label names to ids")


def label_tokens(ids: list[int], offsets: Sequence[tuple[int, int]], spans: list[Span],
                  special_ids: set[int]) -> list[int]:
    """Return the loss labels of a rendered text's tokens: the token id where the token starts inside a span (and,
    for a fallback span, the special tokens right after it), else IGNORE_INDEX."""
    labels = [IGNORE_INDEX] * len(ids)
    j = 0
    last_in: dict[int, int] = {}
    for t, (start, _end) in enumerate(offsets):
        while j < len(spans) and spans[j].end <= start:
            j += 1
        if j < len(spans) and spans[j].start <= start < spans[j].end:
            labels[t] = ids[t]
            last_in[j] = t
    for j, t in last_in.items():  # fallback spans: the end-of-turn is the special tokens that follow
        if spans[j].extend_special:
            t += 1
            while t < len(ids) and ids[t] in special_ids and labels[t] == IGNORE_INDEX:
                labels[t] = ids[t]
                t += 1
    return labels


def encode_with_offsets(tokenizer: Any, texts: list[str], all_spans: list[list[Span]]
                         ) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Return the token ids and character offsets of each text (fast tokenizers), or for slow tokenizers the same
    from tokenizing the pieces between span edges."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [(list(ids), [tuple(o) for o in offs])
                for ids, offs in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]
    # slow tokenizers have no offsets: tokenize the pieces between span edges and stitch them
    out = []
    for text, spans in zip(texts, all_spans, strict=True):
        edges = sorted({0, len(text), *(e for s in spans for e in (s.start, s.end))})
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for a, b in itertools.pairwise(edges):
            piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            ids += piece
            offsets += [(a, b)] * len(piece)
        out.append((ids, offsets))
    return out


def _causal_candidates(examples: Sequence[Example], tokenizer: Any, train_on_prompt: bool
                       ) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example, before the length policy."""
    renderer = ChatRenderer(tokenizer)
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    eos = tokenizer.eos_token_id
    results: list[tuple[list[int], list[int]] | None] = [None] * len(examples)
    chat_idx, texts, spans, plain_idx = [], [], [], []
    for i, ex in enumerate(examples):
        if ex.messages is not None:
            rendered = renderer.render_with_spans(ex.messages, ex.origin, train_on_prompt=train_on_prompt,
                                                  tools=ex.tools)
            chat_idx.append(i)
            texts.append(rendered.text)
            spans.append(rendered.spans)
        elif ex.label is not None:
            raise DataError(f"{ex.origin}: a classification example (text + label) cannot train a causal "
                            "LM; set model.task=classification, or use a chat or text format")
        elif ex.text is not None:
            plain_idx.append(i)
        else:
            raise DataError(f"{ex.origin}: the example has neither messages nor text")
    if chat_idx:
        encoded_chats = encode_with_offsets(tokenizer, texts, spans)
        for i, (ids, offsets), sp in zip(chat_idx, encoded_chats, spans, strict=True):
            results[i] = (ids, label_tokens(ids, offsets, sp, special_ids))
    if plain_idx:
        encoded = tokenizer([examples[i].text for i in plain_idx])["input_ids"]
        for i, ids in zip(plain_idx, encoded, strict=True):
            ids = list(ids)
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
            results[i] = (ids, list(ids))
    return [r for r in results if r is not None]


def _classification_candidates(examples: Sequence[Example], tokenizer: Any
                               ) -> list[dict[str, list[int]]]:
    """Untruncated encodings (input_ids, maybe token_type_ids) per example."""
    for ex in examples:
        if ex.text is None or ex.messages is not None:
            raise DataError(f"{ex.origin}: classification needs text + label examples, not a conversation; "
                            "set data.format=classification or model.task=causal_lm")
    results: list[dict[str, list[int]] | None] = [None] * len(examples)
    for with_pair in (False, True):
        idx = [i for i, e in enumerate(examples) if (e.text_pair is not None) == with_pair]
        if not idx:
            continue
        pairs = [examples[i].text_pair for i in idx] if with_pair else None
        enc = tokenizer([examples[i].text for i in idx], pairs)
        for k, i in enumerate(idx):
            results[i] = {key: list(enc[key][k]) for key in ("input_ids", "token_type_ids") if key in enc}
    return [r for r in results if r is not None]


def too_long_error(origin: str, n: int, max_length: int) -> DataError:
    """Return the error for an example of ``n`` tokens over ``max_length`` under ``data.truncation: error``."""
    return DataError(f"{origin}: example is {n} tokens, longer than data.max_length={max_length}; raise "
                     "max_length or set data.truncation to drop|truncate")


def tokenize_examples(examples: Sequence[Example], tokenizer: Any, *, task: str, max_length: int,
                      truncation: str, train_on_prompt: bool = False,
                      label2id: dict[str, int] | None = None
                      ) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenize examples for ``task`` and apply the length policy ``truncation`` (drop|truncate|error).

    Causal LM chat examples are rendered with the tokenizer's chat template (or, when it has none, the
    built-in ``### User:`` template of ``data.chat``) and get the loss on assistant content plus its
    end-of-turn tokens (everything with ``train_on_prompt``); weight-0 assistant turns get none.
    Examples left with no supervised position (``labels[1:]`` all -100) are dropped.
    Returns the kept examples in order and a TokenizeReport with the counts.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    report = TokenizeReport(n_in=len(examples), task=task)
    kept: list[TokenizedExample] = []
    if task == "causal_lm":
        candidates = _causal_candidates(examples, tokenizer, train_on_prompt)
        for ex, (ids, labels) in zip(examples, candidates, strict=True):
            truncated = False
            if len(ids) > max_length:
                if truncation == "error":
                    raise too_long_error(ex.origin, len(ids), max_length)
                if truncation == "drop":
                    report.drop(f"longer than {max_length} tokens")
                    continue
                ids, labels, truncated = ids[:max_length], labels[:max_length], True
            if all(lab == IGNORE_INDEX for lab in labels[1:]):
                report.drop("no tokens with loss" + (" after truncation" if truncated else ""))
                continue
            report.n_truncated += truncated
            kept.append(TokenizedExample(ids, labels, ex.origin))
    else:
        for ex, enc in zip(examples, _classification_candidates(examples, tokenizer), strict=True):
            class_id = _class_id(ex, label2id)
            truncated = False
            if len(enc["input_ids"]) > max_length:
                if truncation == "error":
                    raise too_long_error(ex.origin, len(enc["input_ids"]), max_length)
                if truncation == "drop":
                    report.drop(f"longer than {max_length} tokens")
                    continue
                enc = tokenizer(ex.text, ex.text_pair, truncation=True, max_length=max_length)
                truncated = True
            report.n_truncated += truncated
            kept.append(TokenizedExample(list(enc["input_ids"]), [], ex.origin, label=class_id,
                                         token_type_ids=list(enc["token_type_ids"])
                                         if "token_type_ids" in enc else None))
    report.n_kept = len(kept)
    report.n_tokens = sum(len(t.input_ids) for t in kept)
    report.n_supervised_tokens = (sum(sum(lab != IGNORE_INDEX for lab in t.labels[1:]) for t in kept)
                                  if task == "causal_lm" else report.n_kept)
    return kept, report
