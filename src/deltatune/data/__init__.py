"""Training data: read records, convert formats, tokenize with loss masks, plan and collate batches.

Two transforms, then batching::

    examples = load_examples("train.jsonl")                       # sources + formats -> Examples
    tokenized, report = tokenize_examples(examples, tokenizer, task="causal_lm", max_length=512,
                                          truncation="drop")      # chat template + loss mask
    for indices in plan_batches([len(t.input_ids) for t in tokenized], batch_size=8, mode="pack",
                                seed=42, epoch=0):
        batch = collate([tokenized[i] for i in indices], mode="pack", pad_id=0, task="causal_lm")

Modules: ``sources`` (files and hub data sets), ``formats`` (alpaca, messages, sharegpt,
prompt_completion, classification, text), ``chat`` (template rendering and supervised spans),
``tokenize`` (ids, labels, length policy), ``batching`` (packing, bucketing, padding).
"""

from __future__ import annotations

from deltatune.data.batching import block_causal_mask, collate, padding_waste, plan_batches, split_by_tokens
from deltatune.data.formats import FORMATS, Example, Message, detect_format, to_example, to_examples
from deltatune.data.sources import SUPPORTED, read_records
from deltatune.data.tokenize import (
    IGNORE_INDEX,
    TokenizedExample,
    TokenizeReport,
    build_label_map,
    label_key,
    tokenize_examples,
)


def load_examples(path: str, fmt: str = "auto", *, split: str = "train", max_examples: int | None = None,
                  system_prompt: str | None = None, skipped: list[str] | None = None) -> list[Example]:
    """Read a data file (or ``hub:NAME``) and convert it to Examples of one format.

    ``max_examples`` keeps only the first N records. Returns the examples in file order; raises DataError
    naming the file and line of the first problem, or with a ``skipped`` list collects each bad record's error
    there and leaves the record out (``data.on_invalid: skip``).
    """
    records = read_records(path, split=split)
    if max_examples is not None:
        records = records[:max_examples]
    return to_examples(records, fmt, system_prompt=system_prompt, skipped=skipped)


__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "SUPPORTED",
    "Example",
    "Message",
    "TokenizeReport",
    "TokenizedExample",
    "block_causal_mask",
    "build_label_map",
    "collate",
    "detect_format",
    "label_key",
    "load_examples",
    "padding_waste",
    "plan_batches",
    "read_records",
    "split_by_tokens",
    "to_example",
    "to_examples",
    "tokenize_examples",
]
