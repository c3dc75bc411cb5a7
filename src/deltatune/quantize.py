"""Quantized bases: store the frozen linear weights in 8 or 4 bits with bitsandbytes (QLoRA's recipe).

    model = quantize_model(model, QuantSpec("nf4", double_quant=True, compute_dtype=torch.float32), device)

Every linear layer except the output head(s) becomes a bitsandbytes layer (Dettmers et al.):

- ``int8``: ``Linear8bitLt``, LLM.int8() -- int8 rows with one float32 absmax per row, outlier input
  columns (|x| > 6) computed in 16/32 bits (Dettmers et al. 2022).
- ``nf4`` / ``fp4``: ``Linear4bit`` -- two 4-bit codes per byte, one absmax per block of 64 weights;
  NF4 is the information-theoretically optimal code for normal weights (Dettmers et al. 2023, QLoRA).
  Double quantization stores those absmax constants in 8 bits with a second float32 absmax per 256 of
  them: 32/64 = 0.5 extra bits per weight become 8/64 + 32/(64*256) = 0.127 (about 4.13 bits in all).

Embeddings, norms and heads stay unquantized and are cast to float32 ("kept in higher precision", as
practitioners prepare k-bit models), so a bfloat16 base computes its normalisations and logits in full
precision.
The quantization a model carries is recorded on it (:func:`quantization_of`), so that a saved delta can
ask for the same base again. :func:`dequantize_model` turns every quantized layer back into a plain
``nn.Linear`` (for merging); :func:`prepare_for_training` switches on gradient checkpointing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from deltatune.errors import ConfigError, DeltatuneError
from deltatune.modules import ADDED, output_layer_names

QUANT_ATTR = "deltatune_quantization"
"""The attribute a quantized model carries: the QuantSpec as a dict (see :func:`quantization_of`)."""

INT8_THRESHOLD = 6.0
"""LLM.int8()'s outlier threshold: input columns with a value above it are computed unquantized."""


@dataclass(frozen=True)
class QuantSpec:
    """How the base weights are stored: ``int8``, ``nf4`` or ``fp4``, double quantization, compute dtype."""

    quantize: str
    double_quant: bool = True
    compute_dtype: str = "float32"

    def describe(self) -> str:
        """Return a short label such as ``nf4+dq`` or ``int8``."""
        return self.quantize + ("+dq" if self.double_quant and self.quantize in ("nf4", "fp4") else "")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def spec_from_config(quantize: str, double_quant: bool | None, compute_dtype: str, device: torch.device
                     ) -> QuantSpec | None:
    """Return the QuantSpec of ``model.quantize`` & co (None for ``none``); ``auto`` compute dtype is
    bfloat16 on CUDA and float32 elsewhere; double quantization defaults to on for 4-bit."""
    if quantize == "none":
        return None
    if compute_dtype == "auto":
        compute_dtype = "bfloat16" if device.type == "cuda" else "float32"
    four_bit = quantize in ("nf4", "fp4")
    return QuantSpec(quantize, bool(four_bit and (double_quant is None or double_quant)), compute_dtype)


def _bnb() -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise DeltatuneError("model.quantize needs bitsandbytes: pip install 'deltatune[quant]'") from None
    import logging

    # bitsandbytes looks for an optional faster CPU kernel package and logs its absence on every load
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return bnb


def is_quantized_layer(module: nn.Module) -> bool:
    """Return whether ``module`` is a bitsandbytes 4-bit or 8-bit linear layer (without importing it)."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4") and \
        type(module).__module__.startswith("bitsandbytes")


def quantized_layer_names(model: nn.Module) -> list[str]:
    """Return the names of every quantized linear layer of ``model``, in model order."""
    return [n for n, m in model.named_modules() if is_quantized_layer(m)]


def quantization_of(model: nn.Module) -> dict[str, Any] | None:
    """Return the quantization ``model`` was loaded with (``{"quantize", "double_quant",
    "compute_dtype"}``), or None for an unquantized model."""
    spec = getattr(model, QUANT_ATTR, None)
    return dict(spec) if spec else None


def refuse_quantized(model: nn.Module, method: str, why: str) -> None:
    """Raise ConfigError when ``model`` has quantized layers and ``method`` cannot train over them."""
    names = quantized_layer_names(model)
    if names:
        raise ConfigError(
            f"method {method!r} cannot train over a quantized base ({len(names)} layers stored in "
            f"{(quantization_of(model) or {}).get('quantize', 'k-bit')}): {why}. Use lora, dora, ia3, adapter, "
            "prompt methods or bitfit, or load the base unquantized (model.quantize=none)"
        )


def refuse_quantized_merge(layer: nn.Module, method: str) -> None:
    """Raise DeltatuneError when ``layer`` is quantized: a delta cannot be folded into 4/8-bit weights in
    place (the sum is not representable); de-quantize first."""
    if is_quantized_layer(layer):
        raise DeltatuneError(
            f"cannot fold the {method} delta into quantized weights in place; merge into a de-quantized copy: "
            "`deltatune merge DELTA OUT --dtype float32|bfloat16|float16` (or deltatune.quantize.dequantize_model)"
        )


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """Return the layer's weight as a dense float tensor of shape (out, in): de-quantized for a
    bitsandbytes layer, the weight itself otherwise (no copy)."""
    if not is_quantized_layer(layer):
        return layer.weight
    import bitsandbytes.functional as bf

    w = layer.weight
    if type(layer).__name__ == "Linear8bitLt":
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = layer.state.SCB
        return w.data.float() * (scb.float().unsqueeze(1) / 127.0)
    return bf.dequantize_4bit(w.data, w.quant_state)  # in the dtype the weight was quantized from


def _quantized_linear(layer: nn.Linear, spec: QuantSpec, device: torch.device) -> nn.Module:
    """Return a bitsandbytes copy of ``layer`` on ``device`` (the quantization happens on the move)."""
    bnb = _bnb()
    bias = layer.bias is not None
    weight = layer.weight.data
    if spec.quantize == "int8":
        new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias, has_fp16_weights=False,
                                  threshold=INT8_THRESHOLD, device="meta")
        new.weight = bnb.nn.Int8Params(weight.to(torch.float16 if device.type == "cuda" else torch.float32),
                                       requires_grad=False, has_fp16_weights=False)
    else:
        compute = DTYPES[spec.compute_dtype]
        new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias, compute_dtype=compute,
                                compress_statistics=spec.double_quant, quant_type=spec.quantize,
                                quant_storage=torch.uint8, device="meta")
        new.weight = bnb.nn.Params4bit(weight.to(compute), requires_grad=False,
                                       compress_statistics=spec.double_quant, quant_type=spec.quantize,
                                       quant_storage=torch.uint8)
        # on CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a faster kernel at the first
        # eval-mode forward, permanently; that kernel has no backward (gradients would silently stop at the
        # layer) and rounds differently, so keep one layout for training and evaluation alike
        new.support_avx512bf16_for_cpu = False
    if bias:
        new.bias = nn.Parameter(layer.bias.data.clone(), requires_grad=False)
    new.train(layer.training)
    return new.to(device)


def _unquantized_leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not any(True for _ in m.children()) and not is_quantized_layer(m)]


def quantize_model(model: nn.Module, spec: QuantSpec, device: torch.device) -> nn.Module:
    """Replace every linear layer but the output head(s) by its 8- or 4-bit bitsandbytes version on
    ``device`` (one layer at a time, so the float copies are freed as it goes), cast what stays
    unquantized (norms, embeddings, head) to float32, record the spec on the model
    (:func:`quantization_of`); return the model."""
    if device.type not in ("cpu", "cuda"):
        raise DeltatuneError(f"model.quantize: bitsandbytes runs on cpu and cuda, not on {device}")
    skip = output_layer_names(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip
             and not is_quantized_layer(m)]
    if not names:
        raise DeltatuneError("model.quantize: this model has no linear layer to quantize")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        setattr(parent, child, _quantized_linear(layer, spec, device))
        del layer
    # every unquantized part (norms, embeddings, head) in float32, as practitioners prepare k-bit models:
    # float32 norms alone would hand float32 activations to a bfloat16 head (seen on CUDA)
    for leaf in _unquantized_leaves(model):
        leaf.float()
    setattr(model, QUANT_ATTR, asdict(spec))
    return model


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every quantized linear layer (wrapped ones included) by a plain ``nn.Linear`` holding its
    de-quantized weight in ``dtype``, and forget the recorded quantization; return the model."""
    for name in quantized_layer_names(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        weight = dense_weight(layer)
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=weight.device, dtype=dtype)
        plain.weight.copy_(weight.to(dtype))
        plain.weight.requires_grad_(False)
        if layer.bias is not None:  # keep the bias Parameter itself (BitFit may train it)
            plain.bias = layer.bias
        plain.train(layer.training)
        setattr(parent, child, plain)
    if hasattr(model, QUANT_ATTR):
        delattr(model, QUANT_ATTR)
    return model


# ----------------------------------------------------------------------------------------------------
# memory of the base weights, and preparing a model for training


def _layer_bytes(layer: nn.Module) -> int:
    """Bytes a quantized layer's weight takes: packed codes plus every quantization constant."""
    w = layer.weight
    total = w.data.numel() * w.data.element_size()
    if type(layer).__name__ == "Linear8bitLt":
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(layer.state, "SCB", None)
        return total + (scb.numel() * scb.element_size() if scb is not None else 0)
    qs = w.quant_state
    parts = [qs.absmax, qs.code]
    if getattr(qs, "nested", False):
        parts += [qs.state2.absmax, qs.state2.code, qs.offset]
    return total + sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Return the bytes of the base model's weights per storage type: ``nf4+dq``/``nf4``/``fp4``/``int8``
    for quantized linear layers (constants included), the dtype name for every other parameter. Modules
    a method added are left out; shared (tied) tensors count once."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for module in model.modules():
        if getattr(module, ADDED, False):
            continue
        if is_quantized_layer(module):
            label = "int8" if type(module).__name__ == "Linear8bitLt" else module.weight.quant_type
            if label != "int8" and getattr(module.weight.quant_state, "nested", False):
                label += "+dq"
            out[label] = out.get(label, 0) + _layer_bytes(module)
            seen.add(id(module.weight))
            params = [p for n, p in module.named_parameters(recurse=False) if n != "weight"]
        else:
            params = list(module.parameters(recurse=False))
        for p in params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            key = str(p.dtype).removeprefix("torch.")
            out[key] = out.get(key, 0) + p.numel() * p.element_size()
    return out


def describe_weight_memory(model: nn.Module) -> str:
    """Return one line: the base weights' memory in all and per storage type, largest first."""
    sizes = weight_bytes(model)
    total = sum(sizes.values())
    parts = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1]))
    return f"base weights: {total / 2**20:.1f} MiB ({parts})"


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them (less memory,
    about a third more compute); inputs get gradients so checkpointed blocks see a graph even when
    every base weight is frozen. Raises ConfigError for an architecture without support."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support it; "
                          "set it to false")
    kwargs = {"use_reentrant": False}  # the non-reentrant form needs no input that requires grad, but see below
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


def prepare_for_training(model: nn.Module, train_cfg: Any) -> str:
    """Prepare an attached model for training: gradient checkpointing when ``train_cfg`` asks for it (any
    model, quantized or not). Returns the line to print at setup: the base weights' memory per dtype,
    and what was switched on."""
    line = describe_weight_memory(model)
    spec = quantization_of(model)
    if spec:
        line += f"; quantized {QuantSpec(**spec).describe()}, compute in {spec['compute_dtype']}"
    if getattr(train_cfg, "gradient_checkpointing", False):
        enable_gradient_checkpointing(model)
        line += "; gradient checkpointing on"
    return line
