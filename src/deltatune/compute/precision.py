"""Training precision: ``train.precision`` = auto | fp32 | bf16-mixed | bf16.

- ``fp32``: every weight, activation and gradient in float32.
- ``bf16-mixed``: the frozen base weights are stored in bfloat16 (half the memory) and every matmul runs in bfloat16
  (``torch.autocast``), while the parameters that train, their gradients and the optimizer state stay float32
  (master weights: an update smaller than bfloat16's 8-bit mantissa is not lost). What stays float32 and why:
  RMSNorm/LayerNorm (transformers' Llama norm and deltatune's fused one compute in float32 and cast back: the
  variance of bf16 activations loses too many digits), the softmax inside attention (it accumulates in float32;
  the scores it reads are bf16 on deltatune's CPU path, as in transformers' eager attention under autocast), the
  output layer's log-softmax and the loss (``chunked_ce`` computes a float32 log-softmax of the bf16 logits),
  the gradient-norm reduction and the optimizer step (float32 parameters and moments). ``full`` fine-tuning trains
  every weight, so its weights stay float32 masters and only the matmuls run in bfloat16.
- ``bf16``: everything in bfloat16, the trained parameters and their optimizer state too: fastest and smallest,
  but small updates are rounded away over long runs.
- ``auto``: ``bf16-mixed`` where the device has bfloat16 units (CUDA with bf16; CPUs with AVX-512 BF16 or AMX),
  else ``fp32``; the choice and its reason are printed once. ``$DELTATUNE_AUTO_PRECISION`` (fp32, bf16-mixed or
  bf16) sets what auto means on a machine (the test suite pins it to fp32, whose results it compares exactly).

An explicit ``model.dtype`` other than auto keeps its old meaning (``bfloat16``: ``bf16``, ``float32``: ``fp32``)
when ``train.precision`` is auto.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deltatune.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16")
SHAPE_STEP = 64
"""On a CPU in bf16/fp16 every size that varies from call to call (packed rows, per-example attention, the loss's
last chunk of rows, a served prompt, a generation batch) is rounded up to a multiple of this (``shape_step``): the
bf16 kernels (oneDNN's matmuls, flash attention's backward) keep compiled code for every shape they meet, about
0.6 MB per matmul shape against 0.1 MB in float32 (bench/bf16_attention.py), so a process meeting ever-new lengths
grew without bound."""


_LOW = (torch.bfloat16, torch.float16)


def shape_step(device: torch.device | str, *dtypes: torch.dtype) -> int:
    """The multiple a varying size is rounded up to on ``device`` for work in ``dtypes``: ``SHAPE_STEP`` on a CPU
    when any of them is bf16/fp16 or autocast is on there, else 1 (a GPU keeps no code per shape)."""
    kind = torch.device(device).type
    low = any(d in _LOW for d in dtypes) or torch.is_autocast_enabled(kind)
    return SHAPE_STEP if kind == "cpu" and low else 1


def cpu_bf16_flags() -> list[str]:
    """The CPU's bfloat16 feature flags (``avx512_bf16``, ``amx_bf16``) found in /proc/cpuinfo."""
    info = Path("/proc/cpuinfo")
    flags = set()
    if info.is_file():
        line = next((ln for ln in info.read_text().splitlines() if ln.startswith("flags")), "")
        flags = set(line.split())
    return [f for f in ("avx512_bf16", "amx_bf16") if f in flags]


def bf16_units(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` multiplies bfloat16 in hardware, and the reason in words."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)} {'supports' if ok else 'lacks'} bfloat16"
    if device.type == "cpu":
        found = cpu_bf16_flags()
        return bool(found), (f"the CPU has {' and '.join(found)}" if found
                             else "the CPU has no AVX-512 BF16 or AMX (bfloat16 would be emulated, slower)")
    return False, f"{device.type} is not known to have bfloat16 units"


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``name`` (fp32 | bf16-mixed | bf16) and why it was chosen."""

    name: str
    reason: str

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the base weights are loaded in."""
        return torch.float32 if self.name == "fp32" else torch.bfloat16

    @property
    def mixed(self) -> bool:
        """True for bf16-mixed: float32 master weights, bfloat16 matmuls under autocast."""
        return self.name == "bf16-mixed"


def resolve(precision: str, model_dtype: str, device: torch.device) -> Precision:
    """Resolve ``train.precision`` on ``device``, given ``model.dtype`` (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return Precision(precision, "train.precision")
    if model_dtype == "bfloat16":
        return Precision("bf16", "model.dtype=bfloat16")
    if model_dtype in ("float32", "float16"):
        return Precision("fp32", f"model.dtype={model_dtype}")
    pinned = os.environ.get("DELTATUNE_AUTO_PRECISION", "").strip()
    if pinned:
        if pinned not in PRECISIONS[1:]:
            raise ConfigError(f"$DELTATUNE_AUTO_PRECISION={pinned!r}: use one of {', '.join(PRECISIONS[1:])}")
        return Precision(pinned, "$DELTATUNE_AUTO_PRECISION")
    ok, why = bf16_units(device)
    return Precision("bf16-mixed" if ok else "fp32", why)


def store_frozen_in_bfloat16(model: nn.Module) -> int:
    """Store every frozen float32 parameter of ``model`` in bfloat16 (buffers such as rotary frequencies stay as
    they are; quantized weights are not float); return the number of values converted."""
    converted = 0
    for p in model.parameters():
        if not p.requires_grad and p.dtype == torch.float32:
            p.data = p.data.to(torch.bfloat16)
            converted += p.numel()
    return converted


def keep_masters_in_float32(params: dict[str, nn.Parameter]) -> int:
    """Make every trained parameter float32 (its gradient and optimizer state follow); return how many changed."""
    changed = 0
    for p in params.values():
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            changed += 1
    return changed


@contextlib.contextmanager
def autocast(precision: Precision | None, device: torch.device) -> Iterator[None]:
    """Within the block, matmuls run in bfloat16 when ``precision`` is bf16-mixed; otherwise nothing changes."""
    if precision is None or not precision.mixed:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield
