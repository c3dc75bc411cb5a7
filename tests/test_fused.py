"""Fused RMSNorm / SwiGLU (training/fused.py): the patched model computes the same logits and gradients as the
unpatched one under every method, keeps its state_dict, leaves non-standard modules alone, and keeps fewer
bytes for backward."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.compute.loss import causal_lm_loss_sum
from deltatune.config import ModelConfig
from deltatune.quantize import enable_gradient_checkpointing
from deltatune.training.fused import (
    RMSNormFunction,
    SiluMulFunction,
    fused_modules,
    remove_fused_modules,
    use_fused_modules,
)

VOCAB = 128
T = 24


def tiny_llama(seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-layer random float32 LlamaForCausalLM, in train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  tie_word_embeddings=True, initializer_range=0.2)
    fields.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**fields))
    model.config._attn_implementation = "sdpa"
    return model.train()


def batch(seed: int = 1, length: int = T) -> dict[str, torch.Tensor]:
    """One row of random ids, supervised on its second half."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (1, length), generator=gen)
    labels = ids.clone()
    labels[:, : length // 2] = -100
    return {"input_ids": ids, "labels": labels}


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 2) -> None:
    """Move every parameter off its initial value (LoRA's zero B, IA3's ones, norms' ones), so every
    gradient is non-trivial and a norm's weight is not the identity."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dtype.is_floating_point:
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.1)


def run(model: nn.Module, data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return (logits, {name: grad}) of one forward and backward of the summed loss."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=data["input_ids"])
    loss = torch.nn.functional.cross_entropy(out.logits[0, :-1], data["labels"][0, 1:], ignore_index=-100,
                                             reduction="sum")
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def assert_same(a: nn.Module, b: nn.Module, data: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    """Both models give the same logits and the same gradient for every trainable parameter."""
    logits_a, grads_a = run(a, data)
    logits_b, grads_b = run(b, data)
    torch.testing.assert_close(logits_b, logits_a, atol=atol, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, g in grads_a.items():
        assert g is not None and grads_b[name] is not None, name
        torch.testing.assert_close(grads_b[name], g, atol=atol, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


METHODS: list[tuple[str, dict[str, Any] | None]] = [
    ("none", None),
    ("lora", {"name": "lora", "r": 4, "alpha": 8}),
    ("dora", {"name": "lora", "r": 4, "alpha": 8, "use_dora": True}),
    ("ia3", {"name": "ia3"}),
    ("bitfit", {"name": "bitfit"}),
    ("full", {"name": "full"}),
    ("freeze_norms", {"name": "freeze", "layers": 0,
                      "modules": ["input_layernorm", "post_attention_layernorm", "norm"]}),
    ("adapter_parallel", {"name": "adapter", "variant": "parallel", "reduction_factor": 8}),
    ("adapter_houlsby", {"name": "adapter", "variant": "houlsby", "reduction_factor": 8}),
    ("hiwi", {"name": "hiwi"}),
]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize(("name", "method"), METHODS, ids=[m[0] for m in METHODS])
def test_patched_model_has_the_same_logits_and_gradients(name: str, method: dict[str, Any] | None,
                                                         checkpointing: bool) -> None:
    base = tiny_llama()
    if method is not None:
        torch.manual_seed(3)
        dt.attach(base, method)
    perturb(base)
    if checkpointing:
        enable_gradient_checkpointing(base)
    fused = copy.deepcopy(base)
    assert use_fused_modules(fused)
    kinds = sorted(fused_modules(fused).values())
    assert kinds == ["rms_norm"] * 5 + ["swiglu"] * 2  # 2 layers x 2 norms + the final norm; 2 MLPs
    assert not fused_modules(base)
    assert_same(base, fused, batch())


def test_norm_weight_gradient_and_training_flags() -> None:
    """With the norms training (full fine-tuning), their weights get the unpatched gradients; a frozen
    norm weight gets none."""
    base = tiny_llama()
    perturb(base)
    fused = copy.deepcopy(base)
    use_fused_modules(fused)
    for model in (base, fused):
        for n, p in model.named_parameters():
            p.requires_grad_("norm" in n or "mlp" in n)
    assert_same(base, fused, batch())
    for n, p in fused.named_parameters():
        assert (p.grad is not None) == ("norm" in n or "mlp" in n), n


def test_patching_before_attach_and_twice_is_the_same() -> None:
    base = tiny_llama()
    fused = copy.deepcopy(base)
    assert use_fused_modules(fused)
    assert not use_fused_modules(fused)  # already patched: nothing more to do
    for model in (base, fused):
        torch.manual_seed(3)
        dt.attach(model, {"name": "lora", "r": 4})
        perturb(model)
    assert_same(base, fused, batch())


def test_state_dict_classes_copies_and_removal() -> None:
    base = tiny_llama()
    fused = copy.deepcopy(base)
    use_fused_modules(fused)
    assert list(fused.state_dict()) == list(base.state_dict())
    assert [type(m) for m in fused.modules()] == [type(m) for m in base.modules()]
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):  # the patch follows the copy
        assert fused_modules(clone) == fused_modules(fused)
        assert clone.model.norm.forward.args[0] is clone.model.norm
        assert clone.model.layers[1].mlp.forward.args[0] is clone.model.layers[1].mlp
        assert_same(base, clone, batch())
    assert remove_fused_modules(fused) == 7
    assert not fused_modules(fused) and "forward" not in vars(fused.model.norm)
    assert_same(base, fused, batch())


class OnePlusRMSNorm(nn.Module):
    """A Gemma-style norm, ``(1 + weight) * x / rms(x)``, with Llama's attribute names."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return ((1.0 + self.weight) * x).to(hidden_states.dtype)


class SwappedMLP(nn.Module):
    """``down(up(x) * silu(gate(x)))`` spelt with the SiLU on the up projection: the same names, not SwiGLU."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = mlp.gate_proj, mlp.up_proj
        self.down_proj, self.act_fn = mlp.down_proj, mlp.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


def test_non_standard_norms_and_mlps_are_left_alone() -> None:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    model = tiny_llama()
    layers = model.model.layers
    layers[0].input_layernorm = OnePlusRMSNorm(32)
    layers[0].post_attention_layernorm = GemmaRMSNorm(32)
    layers[1].mlp = SwappedMLP(layers[1].mlp)
    layers[0].mlp.act_fn = nn.GELU()
    perturb(model)
    fused = copy.deepcopy(model)
    assert use_fused_modules(fused)
    assert fused_modules(fused) == {"model.layers.1.input_layernorm": "rms_norm",
                                    "model.layers.1.post_attention_layernorm": "rms_norm",
                                    "model.norm": "rms_norm"}
    assert_same(model, fused, batch())


def test_hooked_activation_is_left_alone() -> None:
    model = tiny_llama()
    seen: list[int] = []
    model.model.layers[0].mlp.act_fn.register_forward_hook(lambda m, i, o: seen.append(1))
    use_fused_modules(model)
    assert "model.layers.0.mlp" not in fused_modules(model) and "model.layers.1.mlp" in fused_modules(model)
    model(input_ids=batch()["input_ids"])
    assert seen == [1]


def test_a_module_whose_forward_was_replaced_elsewhere_is_left_alone() -> None:
    model = tiny_llama()
    norm = model.model.norm
    norm.forward = lambda hidden_states: hidden_states  # someone else's patch
    use_fused_modules(model)
    assert "model.norm" not in fused_modules(model) and len(fused_modules(model)) == 6
    x = torch.randn(2, 32)
    assert torch.equal(norm(x), x)


def test_a_model_without_llama_modules_is_not_patched() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.SiLU())
    assert not use_fused_modules(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_functions_match_the_eager_ops(dtype: torch.dtype) -> None:
    """The fused ops against transformers' eager formulas, including a float32 weight over a lower-precision
    input; the SiLU product in float64 through gradcheck too."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 5, 16, generator=gen) * 2).to(dtype).requires_grad_(True)
    for w_dtype in {dtype, torch.float32}:
        norm = LlamaRMSNorm(16, eps=1e-5).to(w_dtype)
        with torch.no_grad():
            norm.weight.add_(torch.randn(16, generator=gen).to(w_dtype))
        want = norm(x)
        got = RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=0, rtol=0)  # the forward is the same ops
        g = torch.randn(want.shape, generator=gen).to(want.dtype)
        want_grads = torch.autograd.grad(want, (x, norm.weight), g)
        got_grads = torch.autograd.grad(got, (x, norm.weight), g)
        tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
        for a, b in zip(got_grads, want_grads, strict=True):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, **tol)
    gate = torch.randn(3, 7, generator=gen).to(dtype).requires_grad_(True)
    up = torch.randn(3, 7, generator=gen).to(dtype).requires_grad_(True)
    want = torch.nn.functional.silu(gate) * up
    got = SiluMulFunction.apply(gate, up)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    g = torch.randn(want.shape, generator=gen).to(dtype)
    for a, b in zip(torch.autograd.grad(got, (gate, up), g), torch.autograd.grad(want, (gate, up), g), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # the same backward kernels: bit for bit
    if dtype == torch.float64:
        # (not the norm: like LlamaRMSNorm it computes in float32, too coarse for finite differences)
        assert torch.autograd.gradcheck(SiluMulFunction.apply, (gate, up))


def saved_bytes(model: nn.Module, data: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct activations autograd keeps for backward during one forward and loss (by
    storage; the model's own parameters, which it also keeps, are not counted)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = causal_lm_loss_sum(model, data)
    loss.backward()
    return sum(storages.values())


def test_fused_model_keeps_far_fewer_bytes_for_backward() -> None:
    """LoRA on every linear layer, a 256-token row, SmolLM2's proportions (head size 64, MLP 2.67x, 3 query
    heads per key/value head; a small vocabulary, as the logits are a small part of a real model's): at least
    20% fewer saved bytes (SmolLM2-135M itself, 1000 tokens: 1.31 GB -> 0.99 GB)."""
    model = tiny_llama(hidden_size=192, intermediate_size=512, num_attention_heads=3, num_key_value_heads=1,
                       num_hidden_layers=3)
    torch.manual_seed(3)
    dt.attach(model, {"name": "lora", "r": 4})
    fused = copy.deepcopy(model)
    assert use_fused_modules(fused)
    data = batch(length=256)
    before, after = saved_bytes(model, data), saved_bytes(fused, data)
    assert after <= 0.8 * before, (before, after)


def test_quantized_base_with_lora(tiny_llama_dir: Path) -> None:
    """An NF4 base: the wrapped 4-bit projections are called as before, same logits and gradients."""
    pytest.importorskip("bitsandbytes")
    model = dt.load_model(ModelConfig(name=str(tiny_llama_dir), device="cpu", quantize="nf4"),
                          task="causal_lm").model.train()
    torch.manual_seed(3)
    dt.attach(model, {"name": "lora", "r": 4})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    fused = copy.deepcopy(model)
    assert use_fused_modules(fused)
    assert sorted(set(fused_modules(fused).values())) == ["rms_norm", "swiglu"]
    data = batch()
    data["input_ids"] = data["input_ids"] * 300
    assert_same(model, fused, data, atol=1e-4)


def test_ia3_feed_forward_scaling_is_kept() -> None:
    """IA3 rescales down_proj's input (the SwiGLU product) inside its own wrapper, which the fused MLP still
    calls: its vectors get the unpatched gradients, and changing them changes the fused model's output."""
    from deltatune.methods.ia3 import IA3Linear

    base = tiny_llama()
    dt.attach(base, {"name": "ia3"})
    perturb(base)
    down = base.model.layers[0].mlp.down_proj
    assert isinstance(down, IA3Linear) and down.feedforward
    fused = copy.deepcopy(base)
    assert fused_modules(fused) == {} and use_fused_modules(fused)
    assert "model.layers.0.mlp" in fused_modules(fused)
    assert_same(base, fused, batch())
    ids = batch()["input_ids"]
    with torch.no_grad():
        before = fused(input_ids=ids).logits
        fused.model.layers[0].mlp.down_proj.ia3_l.mul_(2.0)
        assert not torch.allclose(fused(input_ids=ids).logits, before)


def test_bfloat16_model_same_logits_gradients_as_close_to_float64_as_eager() -> None:
    """A bfloat16 base with LoRA: the forward is the same ops (the same logits); the gradients are as close to
    float64's as the eager bfloat16 model's (the norms keep their bf16 output, not their input, for backward)."""
    exact = tiny_llama().to(torch.float64)
    torch.manual_seed(3)
    dt.attach(exact, {"name": "lora", "r": 4})
    perturb(exact)
    _, truth = run(exact, batch())
    base = copy.deepcopy(exact).to(torch.bfloat16)
    fused = copy.deepcopy(base)
    assert use_fused_modules(fused)
    logits_a, grads_a = run(base, batch())
    logits_b, grads_b = run(fused, batch())
    torch.testing.assert_close(logits_b, logits_a, atol=0, rtol=0)

    def error(grads: dict[str, torch.Tensor]) -> float:
        got = torch.cat([grads[n].double().flatten() for n in truth])
        want = torch.cat([g.flatten() for g in truth.values()])
        return float((got - want).norm() / want.norm())

    eager, mine = error(grads_a), error(grads_b)
    assert 0 < eager < 0.1, eager  # bfloat16 rounding, a few percent
    assert mine <= 1.1 * eager, (mine, eager)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_norm_keeps_its_output_for_backward_not_its_input(dtype: torch.dtype) -> None:
    """The fused norm keeps the output the next layer keeps anyway (no row-sized tensor of its own), in bf16 as in
    float32; a weight with a zero, which ``y / weight`` cannot undo, makes it keep its input."""
    model = tiny_llama().to(dtype)
    assert use_fused_modules(model)
    norm = model.model.layers[0].input_layernorm
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.untyped_storage().data_ptr())
        return t

    for zero, kept in ((False, "output"), (True, "input")):
        with torch.no_grad():
            norm.weight.fill_(1.5)
            norm.weight[3] = 0.0 if zero else 1.5
        x = torch.randn(2, 7, norm.weight.shape[0]).to(dtype).requires_grad_(True)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = norm(x)
        assert {"output": y, "input": x}[kept].untyped_storage().data_ptr() in saved
        assert {"output": x, "input": y}[kept].untyped_storage().data_ptr() not in saved
        r = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (grad,) = torch.autograd.grad(y, x, r.to(dtype))
        x64 = x.detach().double().requires_grad_(True)
        w64 = norm.weight.detach().double()
        want = w64 * x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + norm.variance_epsilon)
        (want_grad,) = torch.autograd.grad(want, x64, r)
        tol = 3e-2 if dtype == torch.bfloat16 else 1e-4  # bf16: the gradient to bf16 rounding
        assert (grad.double() - want_grad).abs().max() <= tol * want_grad.abs().max()


def test_training_run_uses_the_fused_modules_with_the_same_update(tiny_llama_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`deltatune train` patches the model and says so; its delta equals that of an unpatched run."""
    import json

    from safetensors.torch import load_file

    from deltatune.cli import main

    rows = [{"messages": [{"role": "user", "content": f"What colour is thing {i}?"},
                          {"role": "assistant", "content": ["red", "green", "blue"][i % 3]}]} for i in range(12)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def train(out: Path, *extra: str) -> dict[str, torch.Tensor]:
        assert main(["train", f"model.name={tiny_llama_dir}", f"data.train={data}", f"output.dir={out}",
                     "train.seed=3", "train.batch_size=4", "method.r=4", "train.max_steps=2", "data.eval=null",
                     "train.lr=1e-3", "--no-progress", *extra]) == 0
        return load_file(out / "adapter_model.safetensors")

    fused = train(tmp_path / "fused")
    assert "fused RMSNorm/SwiGLU" in capsys.readouterr().out
    plain = train(tmp_path / "plain", "train.fused_modules=false")
    assert "fused RMSNorm/SwiGLU" not in capsys.readouterr().out
    assert fused.keys() == plain.keys()
    for k, v in plain.items():
        torch.testing.assert_close(fused[k], v, atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in fused.items() if "lora_B" in k)
