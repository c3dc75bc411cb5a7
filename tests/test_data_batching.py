"""Batch planning (pack, bucket, pad), collation and padding waste, on synthetic examples."""

from __future__ import annotations

import random

import pytest
import torch

from deltatune.data import IGNORE_INDEX, TokenizedExample, block_causal_mask, collate, padding_waste, plan_batches

_RNG = random.Random(7)
LENGTHS = [_RNG.randint(5, 300) for _ in range(203)]


@pytest.mark.parametrize("mode", ["pack", "bucket", "pad"])
def test_plan_covers_every_index_once(mode: str) -> None:
    batches = plan_batches(LENGTHS, batch_size=8, mode=mode, seed=1, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(LENGTHS)))
    assert sorted(len(b) for b in batches)[1:] == [8] * (len(batches) - 1)  # one short batch: 203 = 25*8 + 3
    assert len(batches) == 26


@pytest.mark.parametrize("mode", ["pack", "bucket", "pad"])
def test_plan_is_deterministic_per_seed_and_epoch(mode: str) -> None:
    def plan(seed: int, epoch: int) -> list[list[int]]:
        return plan_batches(LENGTHS, batch_size=8, mode=mode, seed=seed, epoch=epoch)

    assert plan(3, 0) == plan(3, 0)
    assert plan(3, 0) != plan(3, 1)
    assert plan(3, 0) != plan(4, 0)


def test_plan_drop_last() -> None:
    batches = plan_batches(LENGTHS, batch_size=8, mode="bucket", seed=0, epoch=0, drop_last=True)
    assert len(batches) == 25 and all(len(b) == 8 for b in batches)
    assert len({i for b in batches for i in b}) == 200


def test_pad_and_pack_plans_are_the_shuffled_order() -> None:
    pad = plan_batches(LENGTHS, batch_size=8, mode="pad", seed=5, epoch=2)
    assert pad == plan_batches(LENGTHS, batch_size=8, mode="pack", seed=5, epoch=2)
    order = torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(7)).tolist()
    assert [i for b in pad for i in b] == order


def test_bucketing_cuts_padding() -> None:
    def waste(mode: str) -> float:
        return padding_waste(LENGTHS, plan_batches(LENGTHS, batch_size=8, mode=mode, seed=0, epoch=0), mode)

    assert waste("pack") == 0.0
    assert waste("pad") > 0.3  # uniform lengths 5..300: about half the padded positions are padding
    assert waste("bucket") < 0.1
    for batch in plan_batches(LENGTHS, batch_size=8, mode="bucket", seed=0, epoch=0):
        lengths = [LENGTHS[i] for i in batch]
        assert lengths == sorted(lengths)  # sorted within its window


def test_padding_waste_by_hand() -> None:
    assert padding_waste([2, 4, 3, 3], [[0, 1], [2, 3]], "pad") == pytest.approx(2 / 14)
    assert padding_waste([2, 4], [[0, 1]], "pack") == 0.0
    assert padding_waste([], [], "pad") == 0.0


def example(ids: list[int], supervised_from: int) -> TokenizedExample:
    labels = [IGNORE_INDEX] * supervised_from + ids[supervised_from:]
    return TokenizedExample(ids, labels, origin=f"x:{ids[0]}")


def test_collate_pack() -> None:
    a, b = example([11, 12, 13, 14], 2), example([21, 22, 23], 0)
    batch = collate([a, b], mode="pack", pad_id=0, task="causal_lm")
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 21, 22, 23]]
    # b's first label (21) is dropped: position 3 of a must not learn to predict b's first token
    assert batch["labels"].tolist() == [[-100, -100, 13, 14, -100, 22, 23]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert batch["seq_lens"].tolist() == [4, 3]
    assert batch["num_tokens"].item() == 7 and batch["num_supervised"].item() == 4
    mask = batch["attention_mask"]
    assert mask.shape == (1, 1, 7, 7) and mask.dtype == torch.float32
    allowed = mask[0, 0] == 0
    expected = torch.zeros(7, 7, dtype=torch.bool)
    expected[:4, :4] = torch.ones(4, 4, dtype=torch.bool).tril()
    expected[4:, 4:] = torch.ones(3, 3, dtype=torch.bool).tril()
    assert torch.equal(allowed, expected)
    assert mask[0, 0, 4, 0].item() == torch.finfo(torch.float32).min
    assert torch.equal(block_causal_mask([4, 3], torch.bool)[0, 0], expected)
    half = collate([a, b], mode="pack", pad_id=0, task="causal_lm", mask_dtype=torch.bfloat16)["attention_mask"]
    assert half.dtype == torch.bfloat16 and torch.equal(half[0, 0] == 0, expected)


@pytest.mark.parametrize("mode", ["pad", "bucket"])
def test_collate_padded(mode: str) -> None:
    a, b = example([11, 12, 13, 14], 2), example([21, 22], 0)
    batch = collate([a, b], mode=mode, pad_id=99, task="causal_lm")
    assert set(batch) == {"input_ids", "labels", "attention_mask", "position_ids", "num_tokens", "num_supervised"}
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14], [21, 22, 99, 99]]
    assert batch["labels"].tolist() == [[-100, -100, 13, 14], [21, 22, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["attention_mask"].dtype == torch.long
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]
    assert batch["num_tokens"].item() == 6
    assert batch["num_supervised"].item() == 3  # labels[:, 1:]: 13, 14 and 22


def test_collate_classification() -> None:
    a = TokenizedExample([101, 7, 8, 102], [], "c:1", label=1, token_type_ids=[0, 0, 0, 0])
    b = TokenizedExample([101, 9, 102], [], "c:2", label=0, token_type_ids=[0, 0, 1])
    for mode in ("pad", "pack"):  # classification is always padded
        batch = collate([a, b], mode=mode, pad_id=0, task="classification")
        assert batch["input_ids"].tolist() == [[101, 7, 8, 102], [101, 9, 102, 0]]
        assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 1, 0]]
        assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
        assert batch["labels"].tolist() == [1, 0]
        assert batch["num_tokens"].item() == 7 and batch["num_supervised"].item() == 2
    no_types = collate([TokenizedExample([1, 2], [], "c:3", label=0)], mode="pad", pad_id=0, task="classification")
    assert "token_type_ids" not in no_types


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        plan_batches([1], batch_size=1, mode="sorted", seed=0, epoch=0)
    with pytest.raises(ValueError, match="at least one"):
        collate([], mode="pad", pad_id=0, task="causal_lm")


def test_split_by_tokens_keeps_order_and_bounds_each_pass() -> None:
    from deltatune.data import split_by_tokens

    lengths = {7: 300, 2: 500, 9: 200, 4: 1500, 5: 100}
    assert split_by_tokens([7, 2, 9, 4, 5], lengths, 1024) == [[7, 2, 9], [4], [5]]
    assert split_by_tokens([7, 2, 9, 4, 5], lengths, None) == [[7, 2, 9, 4, 5]]
    assert split_by_tokens([7, 2], lengths, 100) == [[7], [2]]  # an example longer than the cap runs alone
