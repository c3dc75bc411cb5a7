"""train.precision: auto's choice, bf16-mixed's dtypes (frozen weights bf16, masters and optimizer state float32),
outputs after attach, gradients against float32, exact resume, every method, a quantized base, float32 deltas."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from deltatune.cli import main
from deltatune.compute.precision import (
    Precision,
    autocast,
    keep_masters_in_float32,
    resolve,
    store_frozen_in_bfloat16,
)
from deltatune.config import method_config_class
from deltatune.methods import build_method, registered_methods, trainable_parameters
from deltatune.training.callbacks import Callback
from tests.test_train import metrics, train_args, write_chat_data

CPU = torch.device("cpu")
MIXED = "train.precision=bf16-mixed"


def test_auto_is_bf16_mixed_only_where_the_device_has_bf16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    import deltatune.compute.precision as precision

    monkeypatch.delenv("DELTATUNE_AUTO_PRECISION", raising=False)
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    assert resolve("auto", "auto", CPU) == Precision("bf16-mixed", "the CPU has avx512_bf16")
    monkeypatch.setattr(precision, "cpu_bf16_flags", list)
    chosen = resolve("auto", "auto", CPU)
    assert chosen.name == "fp32" and "no AVX-512 BF16 or AMX" in chosen.reason
    assert resolve("bf16", "auto", CPU).name == "bf16"  # asked for by name: whatever the machine
    assert resolve("auto", "bfloat16", CPU).name == "bf16"  # model.dtype keeps its old meaning
    monkeypatch.setenv("DELTATUNE_AUTO_PRECISION", "bf16-mixed")
    assert resolve("auto", "auto", CPU) == Precision("bf16-mixed", "$DELTATUNE_AUTO_PRECISION")


def mixed_lora(model_dir: Path, r: int = 4) -> tuple[torch.nn.Module, dict[str, torch.nn.Parameter]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = method_config_class("lora")(name="lora", r=r, alpha=8, targets="all-linear", dropout=0.0)
    build_method(cfg).attach(model)
    params = trainable_parameters(model)
    store_frozen_in_bfloat16(model)
    keep_masters_in_float32(params)
    return model, params


def test_bf16_mixed_attach_keeps_the_bf16_bases_outputs_and_float32_masters(tiny_llama_dir: Path) -> None:
    model, params = mixed_lora(tiny_llama_dir)
    assert all(p.dtype == torch.float32 for p in params.values())
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 420, 3355, 28, 905, 17, 2]])
    mixed = Precision("bf16-mixed", "test")
    with torch.no_grad(), autocast(mixed, CPU):
        assert torch.equal(model(ids).logits, base(ids).logits)


def test_one_bf16_mixed_step_gives_float32s_gradients_within_bf16_rounding(tiny_llama_dir: Path) -> None:
    model, params = mixed_lora(tiny_llama_dir)
    torch.manual_seed(0)
    for name, p in params.items():  # a trained-looking delta, the same in both
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    cfg = method_config_class("lora")(name="lora", r=4, alpha=8, targets="all-linear", dropout=0.0)
    build_method(cfg).attach(reference)
    ref_params = trainable_parameters(reference)
    with torch.no_grad():
        for name, p in params.items():
            ref_params[name].copy_(p)
    ids = torch.randint(3, 4000, (2, 48), generator=torch.Generator().manual_seed(1))
    reference(ids, labels=ids).loss.backward()
    with autocast(Precision("bf16-mixed", "test"), CPU):
        loss = model(ids, labels=ids).loss
    loss.backward()
    got = torch.cat([p.grad.flatten() for p in params.values()])
    want = torch.cat([ref_params[n].grad.flatten() for n in params])
    assert got.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: the gradient's direction and size agree to about a percent
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.995
    assert abs(got.norm() / want.norm() - 1) < 0.03


def test_a_bf16_mixed_run_keeps_masters_and_optimizer_state_in_float32_and_resumes_bit_identically(
        tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_chat_data(tmp_path / "d.jsonl")
    settings = ("train.max_steps=6", "data.eval=null", "train.lr=1e-3", "train.save_every=3", MIXED)

    def args(out: Path) -> list[str]:
        return train_args(tiny_llama_dir, data, out, *settings)

    seen: dict[str, set[torch.dtype]] = {}

    class Dtypes(Callback):
        def on_step_end(self, run: object, metrics: dict) -> None:
            inner = run.inner  # type: ignore[attr-defined]
            seen["trained"] = {p.dtype for p in inner.parameters() if p.requires_grad}
            seen["frozen"] = {p.dtype for p in inner.parameters() if not p.requires_grad}
            seen["moments"] = {v.dtype for s in run.optimizer.state.values()  # type: ignore[attr-defined]
                               for v in s.values() if torch.is_tensor(v) and v.dim() > 0}

    straight = tmp_path / "straight"
    assert main(args(straight), callbacks=[Dtypes()]) == 0
    assert "precision: bf16-mixed (train.precision)" in capsys.readouterr().out
    assert seen == {"trained": {torch.float32}, "frozen": {torch.bfloat16}, "moments": {torch.float32}}
    delta = load_file(straight / "adapter_model.safetensors")
    assert {v.dtype for v in delta.values()} == {torch.float32}

    class CtrlCAfterStep4(Callback):
        def on_step_end(self, run: object, metrics: dict) -> None:
            if metrics["step"] == 4:
                raise KeyboardInterrupt

    resumed = tmp_path / "resumed"
    assert main(args(resumed), callbacks=[CtrlCAfterStep4()]) == 130
    assert main([*args(resumed), "--resume"]) == 0
    again = load_file(resumed / "adapter_model.safetensors")
    assert all(torch.equal(delta[k], again[k]) for k in delta)
    losses = [m["loss"] for m in metrics(straight) if "loss" in m]
    assert losses == [m["loss"] for m in metrics(resumed) if "loss" in m]


# qlora as LoRA on an NF4 base: its paged-optimizer preset prints a once-per-process note another test looks for
SETTINGS = {"lora": ("method.r=4",), "qlora": ("method.r=4", "model.quantize=nf4", "model.double_quant=true"),
            "compose": ("method=[{name: lora, r: 2}, {name: bitfit}]",)}


@pytest.mark.parametrize("method", sorted(registered_methods()))
def test_every_method_trains_under_bf16_mixed(method: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    data = write_chat_data(tmp_path / "d.jsonl", n=8)
    extra = SETTINGS.get(method, (f"method.name={method}",))
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    out = tmp_path / method
    argv = [a for a in train_args(tiny_llama_dir, data, out, "train.max_steps=2", "data.eval=0.25", MIXED, *extra)
            if a != "method.r=4" or method in ("lora", "qlora")]
    assert main(argv) == 0
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    evals = [m["eval_loss"] for m in metrics(out) if "eval_loss" in m]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses + evals)))
    delta = load_file(out / "adapter_model.safetensors")
    assert all(v.dtype == torch.float32 for v in delta.values() if v.is_floating_point())


def test_pure_bf16_trains_in_bf16_and_still_writes_a_float32_delta(tiny_llama_dir: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = write_chat_data(tmp_path / "d.jsonl", n=8)
    out = tmp_path / "bf16"
    assert main(train_args(tiny_llama_dir, data, out, "train.max_steps=2", "data.eval=null",
                           "train.precision=bf16")) == 0
    assert "precision: bf16 (train.precision)" in capsys.readouterr().out
    assert {v.dtype for v in load_file(out / "adapter_model.safetensors").values()} == {torch.float32}


def test_dpo_trains_under_bf16_mixed_on_rows_rounded_up(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from tests.test_preference import write_pairs

    data = write_pairs(tmp_path / "p.jsonl", n=12)
    out = tmp_path / "dpo"
    assert main(train_args(tiny_llama_dir, data, out, "train.max_steps=2", "data.eval=0.25", MIXED,
                           "train.objective=dpo")) == 0
    steps = [m for m in metrics(out) if "loss" in m]
    assert len(steps) == 2 and steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # the policy starts as the reference
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["reward_margin"]) for m in steps)


@pytest.mark.parametrize(("batch", "heads", "kv_heads", "length"),
                         [(1, 9, 3, 37), (2, 4, 4, 130), (1, 8, 2, 300), (2, 4, 2, 449), (1, 9, 3, 2100)])
def test_bf16_causal_attention_matches_float64_within_bf16_rounding(batch: int, heads: int, kv_heads: int,
                                                                     length: int) -> None:
    from deltatune.compute.attention import MATH_MAX_LENGTH, causal_sdpa

    g = torch.Generator().manual_seed(length)
    # the query as transformers hands it over: a transposed, non-contiguous view
    q = (torch.randn(batch, length, heads, 64, generator=g) * 2).transpose(1, 2)
    k, v = torch.randn(2, batch, kv_heads, length, 64, generator=g).unbind(0)
    grad_out = torch.randn(batch, heads, length, 64, generator=g)
    results = {}
    for dtype in (torch.float64, torch.bfloat16):
        qq, kk, vv = (t.to(dtype).requires_grad_() for t in (q, k * 2, v))
        if dtype == torch.float64:
            out = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=0.1,
                                                                   enable_gqa=heads != kv_heads)
        else:
            out = causal_sdpa(qq, kk, vv, scale=0.1)
            assert out.dtype == torch.bfloat16 and out.shape == (batch, heads, length, 64)
        out.backward(grad_out.to(dtype))
        results[dtype] = [out.double()] + [t.grad.double() for t in (qq, kk, vv)]
    for name, got, want in zip(("out", "dq", "dk", "dv"), results[torch.bfloat16], results[torch.float64],
                               strict=True):
        error = float((got - want).norm() / want.norm())
        assert error < 0.02, f"{name}: relative error {error:.4f} (length {length}, math path "
        f"{length <= MATH_MAX_LENGTH})"


@pytest.mark.parametrize(("length", "cut"), [(50, 30), (300, 200)])  # one block; blocks of 128
def test_bf16_causal_attention_never_lets_a_query_see_a_later_token(length: int, cut: int) -> None:
    from deltatune.compute.attention import causal_sdpa

    q, k, v = torch.randn(3, 1, 4, length, 32, dtype=torch.bfloat16).unbind(0)
    changed = v.clone()
    changed[:, :, cut:] += 5  # later tokens only
    k2 = k.clone()
    k2[:, :, cut:] -= 3
    a, b = causal_sdpa(q, k, v), causal_sdpa(q, k2, changed)
    assert torch.equal(a[:, :, :cut], b[:, :, :cut])
    assert not torch.equal(a[:, :, cut:], b[:, :, cut:])


def test_shape_step_rounds_only_low_precision_work_on_a_cpu() -> None:
    from deltatune.compute.precision import SHAPE_STEP, shape_step

    assert shape_step("cpu", torch.bfloat16) == shape_step(CPU, torch.float32, torch.float16) == SHAPE_STEP
    assert shape_step(CPU, torch.float32) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert shape_step(CPU, torch.float32) == SHAPE_STEP  # float32 inputs, bf16 matmuls
    assert shape_step("cuda", torch.bfloat16) == 1  # a GPU keeps no compiled code per shape
