"""Preference pairs: tokenize a prompt with its two replies, and pack pairs into rows that share the prompt.

    pairs, report = tokenize_pairs(examples, tokenizer, max_length=512, truncation="drop")
    batch = collate_pairs([pairs[i] for i in indices], block_mask=True)

Each reply is rendered with the prompt through the chat template (``data.chat``), so a pair is tokenized exactly as
supervised fine-tuning would tokenize either conversation; the loss positions are the reply's content and its
end-of-turn. The prompt is the longest common prefix of the two token sequences (cut before the first supervised
token), so it is stored, and computed, once.

A pair is packed as ``[prompt][chosen][rejected]``: the chosen reply continues the prompt (positions P..P+C-1), the
rejected reply continues the prompt too (positions P..P+R-1) and never sees the chosen one. The prompt's forward and
backward pass runs once per pair instead of twice (TRL runs it twice, once in each sequence). The first token of
each reply is predicted from the prompt's last position, so that hidden state serves both replies. The rows are
kept apart either by a (1, 1, T, T) mask (additive float, as for packed SFT rows) or, for a model that runs
deltatune's per-example attention, by the pair layout (``compute/attention.py``), which attends within each pair
only and needs no mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deltatune.data.chat import ChatRenderer
from deltatune.data.formats import Example, Message
from deltatune.data.tokenize import IGNORE_INDEX, TokenizeReport, encode_with_offsets, label_tokens, too_long_error
from deltatune.errors import DataError


@dataclass
class TokenizedPair:
    """A preference pair as token ids: the shared prompt and each reply with its loss labels (-100: no loss)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    origin: str

    @property
    def input_ids(self) -> list[int]:
        """Every token the pair puts in a packed row (prompt, chosen, rejected): its length plans the batches."""
        return self.prompt_ids + self.chosen_ids + self.rejected_ids


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _first_supervised(labels: Sequence[int]) -> int:
    return next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))


def _render_pair(example: Example, renderer: ChatRenderer) -> tuple[tuple[str, Any], tuple[str, Any]]:
    assert example.messages is not None and example.chosen is not None and example.rejected is not None
    prompt = [Message(m.role, m.content, 0 if m.role == "assistant" else None) for m in example.messages]
    out = []
    for reply in (example.chosen, example.rejected):
        rendered = renderer.render_with_spans([*prompt, reply], example.origin)
        out.append((rendered.text, rendered.spans))
    return out[0], out[1]


def tokenize_pairs(examples: Sequence[Example], tokenizer: Any, *, max_length: int, truncation: str
                   ) -> tuple[list[TokenizedPair], TokenizeReport]:
    """Tokenize preference pairs and apply the length policy to each sequence (prompt + one reply).

    ``drop`` drops a pair whose longer sequence exceeds ``max_length``; ``truncate`` cuts the replies' ends (a
    prompt that leaves no room drops the pair); ``error`` stops naming the record. Returns the kept pairs and a
    TokenizeReport (``n_tokens``: tokens of the packed rows, prompt once; ``n_supervised_tokens``: reply tokens
    with a loss)."""
    report = TokenizeReport(n_in=len(examples), task="preference")
    renderer = ChatRenderer(tokenizer)
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    texts, spans = [], []
    for ex in examples:
        if not ex.is_pair:
            raise DataError(f"{ex.origin}: not a preference pair (prompt, chosen, rejected); train.objective "
                            "dpo|ipo|simpo|orpo needs pairs in every record, or set train.objective=sft")
        for text, sp in _render_pair(ex, renderer):
            texts.append(text)
            spans.append(sp)
    encoded = encode_with_offsets(tokenizer, texts, spans) if texts else []
    kept: list[TokenizedPair] = []
    for k, ex in enumerate(examples):
        (ids_c, off_c), (ids_r, off_r) = encoded[2 * k], encoded[2 * k + 1]
        lab_c = label_tokens(ids_c, off_c, spans[2 * k], special_ids)
        lab_r = label_tokens(ids_r, off_r, spans[2 * k + 1], special_ids)
        p = min(_common_prefix(ids_c, ids_r), _first_supervised(lab_c), _first_supervised(lab_r))
        longest = max(len(ids_c), len(ids_r))
        truncated = False
        if longest > max_length:
            if truncation == "error":
                raise too_long_error(ex.origin, longest, max_length)
            if truncation == "drop" or p >= max_length - 1:
                report.drop(f"longer than {max_length} tokens")
                continue
            ids_c, lab_c, ids_r, lab_r = ids_c[:max_length], lab_c[:max_length], ids_r[:max_length], lab_r[:max_length]
            truncated = True
        pair = TokenizedPair(ids_c[:p], ids_c[p:], lab_c[p:], ids_r[p:], lab_r[p:], ex.origin)
        if p == 0 or all(lab == IGNORE_INDEX for lab in pair.chosen_labels) or all(
                lab == IGNORE_INDEX for lab in pair.rejected_labels):
            report.drop("no prompt or a reply with no tokens" + (" after truncation" if truncated else ""))
            continue
        report.n_truncated += truncated
        kept.append(pair)
    report.n_kept = len(kept)
    report.n_tokens = sum(len(p.input_ids) for p in kept)
    report.n_supervised_tokens = sum(sum(lab != IGNORE_INDEX for lab in p.chosen_labels + p.rejected_labels)
                                     for p in kept)
    return kept, report


def pair_mask(layout: Sequence[tuple[int, int, int, int]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (1, 1, T, T) mask of packed pairs ``layout`` ((start, P, C, R) each): a token sees the earlier tokens of
    its own pair's prompt and its own reply. ``torch.bool``: True where allowed; a float dtype: additive (0.0 where
    allowed, the dtype's most negative value elsewhere)."""
    pair_of, branch, position = [], [], []
    for k, (_start, p, c, r) in enumerate(layout):
        pair_of += [k] * (p + c + r)
        branch += [0] * p + [1] * c + [2] * r
        position += [*range(p), *range(p, p + c), *range(p, p + r)]
    pair_t, branch_t, pos_t = torch.tensor(pair_of), torch.tensor(branch), torch.tensor(position)
    allowed = ((pair_t[:, None] == pair_t[None, :]) & (pos_t[None, :] <= pos_t[:, None])
               & ((branch_t[None, :] == 0) | (branch_t[None, :] == branch_t[:, None])))
    if dtype == torch.bool:
        return allowed[None, None]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def collate_pairs(pairs: Sequence[TokenizedPair], *, block_mask: bool = True,
                  mask_dtype: torch.dtype = torch.float32, pad_multiple: int | None = None) -> dict[str, torch.Tensor]:
    """Pack ``pairs`` into one row; returns the model inputs and where to read the replies' log-probabilities.

    ``input_ids``/``position_ids`` (1, T); ``attention_mask`` (1, 1, T, T) when ``block_mask`` (else the layout
    alone keeps pairs apart); ``layout`` (n, 4): start, prompt, chosen and rejected lengths per pair; ``keep`` (N,):
    the position whose output predicts each supervised reply token, ``targets`` (N,) those tokens and ``sequence``
    (N,) which reply they belong to (2k: pair k's chosen, 2k + 1: its rejected); ``num_tokens``, ``num_pairs``.
    ``pad_multiple`` rounds the row up with a filler segment of its own (a prompt-only entry in the layout, no
    reply, not counted), as ``collate`` does for SFT rows in bf16.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    ids: list[int] = []
    positions: list[int] = []
    keep: list[int] = []
    targets: list[int] = []
    sequence: list[int] = []
    layout: list[tuple[int, int, int, int]] = []
    for k, pair in enumerate(pairs):
        start, p, c, r = len(ids), len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        ids += pair.input_ids
        positions += [*range(p + c), *range(p, p + r)]
        for side, reply, labels, first in ((0, pair.chosen_ids, pair.chosen_labels, start + p),
                                           (1, pair.rejected_ids, pair.rejected_labels, start + p + c)):
            for j, (token, label) in enumerate(zip(reply, labels, strict=True)):
                if label == IGNORE_INDEX:
                    continue
                keep.append(start + p - 1 if j == 0 else first + j - 1)
                targets.append(token)
                sequence.append(2 * k + side)
        layout.append((start, p, c, r))
    real = len(ids)
    pad = -real % pad_multiple if pad_multiple else 0
    if pad:
        layout.append((real, pad, 0, 0))
        ids += [0] * pad
        positions += list(range(pad))
    batch = {"input_ids": torch.tensor(ids, dtype=torch.long)[None],
             "position_ids": torch.tensor(positions, dtype=torch.long)[None],
             "layout": torch.tensor(layout, dtype=torch.long),
             "keep": torch.tensor(keep, dtype=torch.long), "targets": torch.tensor(targets, dtype=torch.long),
             "sequence": torch.tensor(sequence, dtype=torch.long),
             "num_tokens": torch.tensor(real), "num_pairs": torch.tensor(len(pairs))}
    if block_mask:
        batch["attention_mask"] = pair_mask(layout, mask_dtype)
    return batch
