"""The chunked output layer + cross-entropy equals the model's own logits + cross-entropy, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
import deltatune.compute.chunked_ce as chunked_ce
from deltatune.compute.chunked_ce import linear_cross_entropy_sum, plain_output_layer
from deltatune.compute.loss import causal_lm_loss_sum


def tiny(tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


def test_linear_cross_entropy_matches_autograd_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunked_ce, "CHUNK_ROWS", 7)  # 30 rows: several chunks and a ragged last one
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    targets[[3, 11, 29]] = -100
    want = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100, reduction="sum")
    gh, gw = torch.autograd.grad(want * 0.5, (hidden, weight))
    got = linear_cross_entropy_sum(hidden, weight, targets)
    h2, w2 = torch.autograd.grad(got * 0.5, (hidden, weight))  # the upstream gradient scales both
    assert torch.allclose(got, want, rtol=1e-5)
    assert torch.allclose(h2, gh, atol=1e-5) and torch.allclose(w2, gw, atol=1e-5)
    with torch.no_grad():  # eval: the value only
        assert torch.allclose(linear_cross_entropy_sum(hidden, weight, targets), want, rtol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_rows_are_padded_to_64_and_the_padding_changes_nothing(autocast: bool,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from deltatune.compute.chunked_ce import linear_token_logps

    monkeypatch.setattr(chunked_ce, "CHUNK_ROWS", 64)
    shapes = []
    real_mm = torch.mm

    def recording_mm(a: torch.Tensor, b: torch.Tensor, **kw: object) -> torch.Tensor:
        shapes.append(a.shape[0])
        return real_mm(a, b, **kw)

    torch.manual_seed(0)
    hidden = torch.randn(77, 16, dtype=torch.float32 if autocast else torch.bfloat16, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.bfloat16)
    targets = torch.randint(0, 50, (77,))
    targets[[3, 76]] = -100
    logits = (hidden.to(torch.bfloat16) @ weight.t()).float()  # what the bf16 matmul gives, unpadded
    want = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    (want_grad,) = torch.autograd.grad(want, hidden)
    monkeypatch.setattr(torch, "mm", recording_mm)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = linear_cross_entropy_sum(hidden, weight, targets)
        (grad,) = torch.autograd.grad(got, hidden)
        logps = linear_token_logps(hidden.detach(), weight, targets.clamp(min=0))
    assert set(shapes) == {64}  # 77 rows: one chunk of 64 and 13 padded up to 64, never a 13-row matmul
    assert grad.shape == hidden.shape and grad.dtype == hidden.dtype
    assert torch.allclose(got, want, rtol=1e-4)
    assert torch.allclose(grad.float(), want_grad.float(), atol=2e-2, rtol=2e-2)
    assert logps.shape == (77,)
    assert torch.allclose(logps, torch.log_softmax(logits, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1),
                          atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_training_loss_is_the_same_with_and_without_chunks(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunked_ce, "CHUNK_ROWS", 5)
    model = tiny()
    dt.attach(model, {"name": method})
    if method == "lora":  # a non-zero update, so the LoRA gradients are not trivially equal
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :9] = -100
    batch = {"input_ids": ids, "labels": labels}
    results = []
    for chunked in (False, True):
        model.zero_grad()
        loss, count = causal_lm_loss_sum(model, batch, chunked=chunked)
        loss.backward()
        results.append((loss.detach(), count, {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None}))
    (la, ca, ga), (lb, cb, gb) = results
    assert ca == cb == 15 and torch.allclose(la, lb, rtol=1e-5)
    assert ga.keys() == gb.keys() and ga
    assert all(torch.allclose(ga[k], gb[k], atol=1e-5) for k in ga)
    assert type(model.lm_head) is torch.nn.Linear  # the output layer is back after the forward


def test_only_plain_output_layers_are_chunked() -> None:
    model = tiny()
    assert plain_output_layer(model) is model.lm_head
    model.config.model_type = "gemma2"  # soft-capped logits: the model computes them itself
    assert plain_output_layer(model) is None
