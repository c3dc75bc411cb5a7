"""Many deltas in one forward: each row of a batch applies its own delta to the same frozen base layers.

    with row_plan(torch.tensor([0, 2, 2, 1])):      # row 0: the base alone, rows 1-2: delta 2, row 3: delta 1
        logits = model(input_ids=ids, ...).logits

A served linear layer keeps the base ``nn.Linear`` untouched and, per delta slot, what that delta adds to it.
For the rows of slot ``s`` (``x_s``: their inputs, ``W x + b``: the base's output):

    LoRA (Hu et al. 2021):     y_s = W x_s + b + scale_s * B_s (A_s x_s)
    DoRA (Liu et al. 2024):    y_s = g_s * (W x_s + scale_s * B_s (A_s x_s)) + b,   g_s = m_s / ||W + scale_s B_s A_s||
    IA3 on outputs (k, v):     y_s = l_s * (W x_s + b)
    IA3 on inputs (FFN down):  y_s = W (l_s * x_s) + b
    BitFit:                    y_s = W x_s + b + (b_s - b)

Rows are grouped by slot once per forward (a few deltas per batch), so each delta costs one small matmul
over its own rows; slot 0 rows see the base alone. With no plan set the layer is the base layer.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

_PLAN = threading.local()


@dataclass
class RowPlan:
    """Which delta slot each row of the batch uses, with the rows of each slot computed once."""

    slots: torch.Tensor  # (B,) long
    groups: dict[int, torch.Tensor | slice] = field(default_factory=dict)  # slot -> its rows (slot 0 left out)

    @classmethod
    def of(cls, slots: torch.Tensor) -> RowPlan:
        """Return the plan for ``slots``. A slot whose rows are consecutive (always so for one request) gets a
        slice: its rows are then views, with no gather and scatter in every layer."""
        groups: dict[int, torch.Tensor | slice] = {}
        for s in slots.unique().tolist():
            if s == 0:
                continue
            rows = (slots == s).nonzero().flatten()
            first, last = int(rows[0]), int(rows[-1])
            groups[int(s)] = slice(first, last + 1) if last - first + 1 == len(rows) else rows
        return cls(slots, groups)


@contextlib.contextmanager
def row_plan(slots: torch.Tensor) -> Iterator[RowPlan]:
    """Within the block, served layers apply per row the delta of ``slots`` (B,) (0: none)."""
    previous = getattr(_PLAN, "plan", None)
    _PLAN.plan = RowPlan.of(slots)
    try:
        yield _PLAN.plan
    finally:
        _PLAN.plan = previous


def current_plan() -> RowPlan | None:
    """Return the plan of the innermost ``row_plan`` block of this thread, or None."""
    return getattr(_PLAN, "plan", None)


class RowDeltaLinear(nn.Module):
    """A frozen base linear layer plus per-slot deltas, each applied to the rows of its slot only."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base: nn.Module = base  # may become an int8 layer (``int8_linear``); the float bias is kept below
        self.base_bias = base.bias.detach().clone() if base.bias is not None else None
        self.lora: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}  # slot -> (A (r, in), B (out, r), s)
        self.scale_out: dict[int, torch.Tensor] = {}  # slot -> (out,)
        self.scale_in: dict[int, torch.Tensor] = {}  # slot -> (in,)
        self.bias_delta: dict[int, torch.Tensor] = {}  # slot -> (out,)
        self.dora: dict[int, torch.Tensor] = {}  # slot -> (out,): DoRA's row scale g

    def use_int8(self) -> None:
        """Store the base weights in int8 (per output channel) and multiply with int8 kernels (see
        :func:`int8_linear`); the deltas stay in float32."""
        self.base = int8_linear(self.base)

    def remove(self, slot: int) -> None:
        """Forget what ``slot`` adds to this layer."""
        for table in (self.lora, self.scale_out, self.scale_in, self.bias_delta, self.dora):
            table.pop(slot, None)

    def dense_weight(self) -> torch.Tensor:
        """Return the base weight (out, in) in float32 (de-quantized when stored in int8)."""
        if isinstance(self.base, Int8Linear):
            return self.base.weight.float() * self.base.scale[:, None]
        return self.base.weight.detach().float()

    @property
    def empty(self) -> bool:
        """Whether no slot adds anything to this layer."""
        return not (self.lora or self.scale_out or self.scale_in or self.bias_delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, in)
        plan = current_plan()
        if plan is None or not plan.groups or self.empty:
            return self.base(x)
        if self.scale_in:
            x_in = x.clone()
            for slot, rows in plan.groups.items():
                if slot in self.scale_in:
                    x_in[rows] = x[rows] * self.scale_in[slot]
            y = self.base(x_in)
        else:
            y = self.base(x)
        for slot, rows in plan.groups.items():
            if slot in self.lora:
                a, b, scale = self.lora[slot]
                update = scale * (x[rows] @ a.T) @ b.T
                if slot in self.dora:
                    wx = y[rows] if self.base_bias is None else y[rows] - self.base_bias
                    y[rows] = self.dora[slot] * (wx + update) + (0 if self.base_bias is None else self.base_bias)
                else:
                    y[rows] += update
            if slot in self.bias_delta:
                y[rows] += self.bias_delta[slot]
            if slot in self.scale_out:
                y[rows] *= self.scale_out[slot]
        return y



class Int8Linear(nn.Module):
    """A linear layer with int8 weights (one scale per output channel) that multiplies in int8 (``torch._int_mm``:
    VNNI / AMX kernels where the CPU has them), as LLM.int8 does (Dettmers et al. 2022):

        x = x_regular + x_outlier          outlier: input channels where some |x| > threshold (6.0)
        y = dequant(int8(x_regular) @ W_int8^T) + x_outlier @ W_deq[:, outlier]^T + b

    Activations are quantized per token (absmax / 127), so one token's large values do not coarsen another's;
    the few outlier channels (LLMs have some, large, in fixed places) go through a float matmul instead."""

    def __init__(self, linear: nn.Linear, threshold: float = 6.0) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        self.scale = (w.abs().amax(dim=1).clamp(min=1e-8) / 127).contiguous()  # (out,)
        q = torch.round(w / self.scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.weight = q.contiguous()  # (out, in) int8; multiplied as the view .t(): for one token 2-3x faster
        self.bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        self.threshold = threshold
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        quantized = _quantized_input(x, self.threshold)
        y = torch._int_mm(quantized.codes, self.weight.t()).float()
        y.mul_(quantized.scales).mul_(self.scale)
        if quantized.outlier is not None:  # the outlier channels' share, in float
            y.addmm_(quantized.outlier_values, self.weight[:, quantized.outlier].t().float() * self.scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features)


@dataclass
class QuantizedInput:
    """An input quantized for :class:`Int8Linear`: int8 codes and per-token scales of the regular channels, and
    the outlier channels' indices and float values (None when no value passed the threshold)."""

    codes: torch.Tensor  # (N, in) int8
    scales: torch.Tensor  # (N, 1)
    outlier: torch.Tensor | None  # (k,) long
    outlier_values: torch.Tensor | None  # (N, k)


_LAST_INPUT = threading.local()


def _quantized_input(x: torch.Tensor, threshold: float) -> QuantizedInput:
    """Quantize ``x`` (..., in) per token, outlier channels apart. The projections that read the same input (q, k
    and v; gate and up) share one quantization: the last one is kept and reused while ``x`` is unchanged."""
    last = getattr(_LAST_INPUT, "entry", None)
    if last is not None and last[0] is x and last[1] == x._version and last[2] == threshold:
        return last[3]
    x2 = x.reshape(-1, x.shape[-1]).float()  # (N, in)
    magnitude = x2.abs()
    outlier = (magnitude.amax(dim=0) > threshold).nonzero().flatten()
    if len(outlier):
        values = x2[:, outlier]
        regular = x2.index_fill(1, outlier, 0.0)
        row_max = regular.abs().amax(dim=1, keepdim=True)
    else:
        values, regular, row_max = None, x2, magnitude.amax(dim=1, keepdim=True)
    scales = row_max.clamp_(min=1e-8).div_(127)
    codes = torch.round(regular / scales).to(torch.int8)
    quantized = QuantizedInput(codes, scales, outlier if len(outlier) else None, values)
    _LAST_INPUT.entry = (x, x._version, threshold, quantized)
    return quantized


def int8_linear(linear: nn.Linear) -> nn.Module:
    """Return ``linear`` as an :class:`Int8Linear` (int8 weights and int8 matmuls, outlier channels in float)."""
    return Int8Linear(linear)
