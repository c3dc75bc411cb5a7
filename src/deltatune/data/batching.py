"""Plan micro-batches and collate them into tensors: packed rows, or padded (bucketed) batches.

    batches = plan_batches(lengths, batch_size=8, mode="pack", seed=42, epoch=0)
    batch = collate([tokenized[i] for i in batches[0]], mode="pack", pad_id=tok.pad_token_id, task="causal_lm")

Packing puts a micro-batch's examples into one row of length T = sum of their lengths and keeps them
apart with a block-diagonal causal mask, restarting position_ids at 0 for each example:

    allowed[q, k] = (k <= q) and (segment[q] == segment[k])          # (T, T)

In transformers 5.24 position_ids alone do not isolate packed sequences (measured on SmolLM2: the second
sequence of a row differs from itself run alone by up to 22.9 in the logits), and a 4D *boolean* mask is
handed to the attention as-is: sdpa reads it as "True = attend", but eager attention *adds* the mask to the
scores (True becomes +1, nothing is masked). So the packed mask is additive by default:
0.0 where attention is allowed and the dtype's most negative value elsewhere, which both sdpa and eager
read correctly (packed logits == each example alone, tested). A float32 mask serves float32 and bf16
models alike (torch's sdpa takes a bool, float32 or query-dtype mask; checked on CPU and an H200);
``mask_dtype=torch.bool`` gives the boolean form (sdpa only, 4x smaller).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from deltatune.data.tokenize import IGNORE_INDEX, TokenizedExample

MODES = ("pack", "bucket", "pad")
BUCKET_WINDOW = 50  # bucket: sort by length within windows of this many batches


def plan_batches(lengths: Sequence[int], *, batch_size: int, mode: str, seed: int, epoch: int,
                 drop_last: bool = False) -> list[list[int]]:
    """Plan one epoch of micro-batches; returns lists of example indices, each index once.

    A torch.Generator seeded with ``seed + epoch`` shuffles, so the plan is reproducible per epoch.
    ``pad`` and ``pack``: the shuffled order cut into batches of ``batch_size`` (``pack`` turns each into
    one row in collate). ``bucket``: the shuffled order sorted by length within windows of
    50 * batch_size, cut into batches, and the batches shuffled. ``drop_last`` drops a final short batch.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if mode == "bucket":
        window = BUCKET_WINDOW * batch_size
        order = [i for w in range(0, len(order), window)
                 for i in sorted(order[w:w + window], key=lambda k: lengths[k])]
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if mode == "bucket":
        batches = [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def split_by_tokens(indices: Sequence[int], lengths: Sequence[int] | Mapping[int, int], max_tokens: int | None
                    ) -> list[list[int]]:
    """Cut a micro-batch's example ``indices`` (in order) into consecutive runs of at most ``max_tokens``
    tokens each; an example longer than that is a run of its own. ``None``: one run. Returns the runs."""
    if max_tokens is None:
        return [list(indices)]
    runs: list[list[int]] = []
    used = 0
    for i in indices:
        if runs and used + lengths[i] <= max_tokens:
            runs[-1].append(i)
            used += lengths[i]
        else:
            runs.append([i])
            used = lengths[i]
    return runs


def padding_waste(lengths: Sequence[int], batches: Sequence[Sequence[int]], mode: str) -> float:
    """Share of padded positions among all positions for this batching (0.0 for ``pack``)."""
    if mode == "pack":
        return 0.0
    positions = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return 1.0 - real / positions if positions else 0.0


def block_causal_mask(seq_lens: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (1, 1, T, T) mask that lets each token see only earlier tokens of its own example.

    ``dtype=torch.bool``: True where attention is allowed. A float dtype: additive, 0.0 where allowed and
    ``finfo(dtype).min`` elsewhere.
    """
    lens = torch.tensor(list(seq_lens))
    segment = torch.repeat_interleave(torch.arange(len(lens)), lens)  # (T,)
    total = int(lens.sum())
    allowed = (segment[:, None] == segment[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    if dtype == torch.bool:
        return allowed[None, None]
    mask = torch.zeros(total, total, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]  # (1, 1, T, T)


def _counts(num_tokens: int | torch.Tensor, num_supervised: int | torch.Tensor) -> dict[str, torch.Tensor]:
    return {"num_tokens": torch.as_tensor(num_tokens, dtype=torch.long),
            "num_supervised": torch.as_tensor(num_supervised, dtype=torch.long)}


def _collate_packed(examples: Sequence[TokenizedExample], mask_dtype: torch.dtype, block_mask: bool,
                    pad_multiple: int | None = None) -> dict[str, torch.Tensor]:
    seq_lens = [len(e.input_ids) for e in examples]
    ids = [t for e in examples for t in e.input_ids]
    # the first label of each example is never a target: the shifted loss must not cross examples
    labels_list = [x for e in examples for x in [IGNORE_INDEX, *e.labels[1:]]]
    real = len(ids)
    pad = -real % pad_multiple if pad_multiple else 0
    if pad:  # a filler segment of its own: no loss, attends only to itself
        seq_lens.append(pad)
        ids += [0] * pad
        labels_list += [IGNORE_INDEX] * pad
    input_ids = torch.tensor(ids, dtype=torch.long)[None]  # (1, T)
    labels = torch.tensor(labels_list, dtype=torch.long)[None]
    position_ids = torch.cat([torch.arange(n) for n in seq_lens])[None]  # (1, T)
    mask = {"attention_mask": block_causal_mask(seq_lens, mask_dtype)} if block_mask else {}
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, **mask,
            "seq_lens": torch.tensor(seq_lens, dtype=torch.long),
            **_counts(real, (labels[:, 1:] != IGNORE_INDEX).sum())}


def _pad(rows: Sequence[Sequence[int]], value: int, multiple: int | None = None) -> torch.Tensor:
    width = max(len(r) for r in rows)
    width += -width % multiple if multiple else 0
    out = torch.full((len(rows), width), value, dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(list(row), dtype=torch.long)
    return out


def _collate_padded(examples: Sequence[TokenizedExample], pad_id: int, multiple: int | None = None
                    ) -> dict[str, torch.Tensor]:
    input_ids = _pad([e.input_ids for e in examples], pad_id, multiple)
    attention_mask = _pad([[1] * len(e.input_ids) for e in examples], 0, multiple)
    labels = _pad([e.labels for e in examples], IGNORE_INDEX, multiple)
    position_ids = (torch.arange(input_ids.shape[1])[None] * attention_mask)  # 0 on padding
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "position_ids": position_ids,
            **_counts(attention_mask.sum(), (labels[:, 1:] != IGNORE_INDEX).sum())}


def _collate_classification(examples: Sequence[TokenizedExample], pad_id: int, multiple: int | None = None
                            ) -> dict[str, torch.Tensor]:
    if any(e.label is None for e in examples):
        raise ValueError("classification collate needs a label id on every example")
    batch = {"input_ids": _pad([e.input_ids for e in examples], pad_id, multiple),
             "attention_mask": _pad([[1] * len(e.input_ids) for e in examples], 0, multiple)}
    if all(e.token_type_ids is not None for e in examples):
        batch["token_type_ids"] = _pad([e.token_type_ids or [] for e in examples], 0, multiple)
    batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)  # (B,)
    return {**batch, **_counts(batch["attention_mask"].sum(), len(examples))}


def collate(examples: Sequence[TokenizedExample], *, mode: str, pad_id: int, task: str,
            mask_dtype: torch.dtype = torch.float32, block_mask: bool = True,
            pad_multiple: int | None = None) -> dict[str, torch.Tensor]:
    """Turn one planned micro-batch into model inputs; returns a dict of tensors.

    ``pack`` (causal LM): one row (1, T) with input_ids, labels (first label of each example -100),
    position_ids restarting per example, a (1, 1, T, T) block-causal attention_mask (additive float,
    see the module docstring) and seq_lens; with ``block_mask=False`` no mask, for a model whose attention
    reads the example boundaries from seq_lens (compute/attention.py); ``pad_multiple`` rounds the row up to a
    multiple of that many tokens with a filler segment of its own (no loss, not counted in ``num_tokens``), and
    padded batches' width likewise, so a bf16 run meets a few shapes instead of hundreds (see
    ``compute.attention.causal_sdpa``).
    ``bucket``/``pad``: right-padded (B, T) input_ids, labels
    (-100 on padding), attention_mask (0/1 long) and position_ids (0 on padding). Classification is
    always padded (``pack`` too): input_ids, attention_mask, token_type_ids if any, labels (B,).
    Every batch has ``num_tokens`` (non-padding tokens) and ``num_supervised`` (positions with a loss
    after the shift, ``labels[:, 1:] != -100``; the batch size for classification): pop these (and
    ``seq_lens``) before calling the model.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not examples:
        raise ValueError("collate needs at least one example")
    if task == "classification":
        return _collate_classification(examples, pad_id, pad_multiple)
    if task != "causal_lm":
        raise ValueError(f"task must be causal_lm or classification, got {task!r}")
    if mode == "pack":
        return _collate_packed(examples, mask_dtype, block_mask, pad_multiple)
    return _collate_padded(examples, pad_id, pad_multiple)
