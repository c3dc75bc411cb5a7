"""Tensors into GGUF types: the ``gguf`` package's numpy quantizers, 1-D tensors kept in float32.

    QUANTS["q8_0"]                     # QuantType: GGML type and the file type llama.cpp reports
    data, qtype = encode(array, QUANTS["q4_0"])

As llama.cpp's own converter does, norms, biases and other 1-D tensors stay float32, and a matrix whose rows do
not split into whole blocks of the chosen type (32 values for the q types) is written as float16 instead.
K-quants (``Q4_K_M`` ...) have no Python quantizer; llama.cpp's ``llama-quantize`` makes them from an f16 or
f32 export.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
from gguf.quants import QuantError, dequantize, quantize

T = gguf.GGMLQuantizationType
F = gguf.LlamaFileType


@dataclass(frozen=True)
class QuantType:
    """One ``--quant`` choice: the GGML tensor type of matrices and the file type written in the header."""

    name: str
    ggml: gguf.GGMLQuantizationType
    file_type: gguf.LlamaFileType
    bits: float  # bits per value, scales included (for messages)


QUANTS = {q.name: q for q in (
    QuantType("f32", T.F32, F.ALL_F32, 32),
    QuantType("f16", T.F16, F.MOSTLY_F16, 16),
    QuantType("bf16", T.BF16, F.MOSTLY_BF16, 16),
    QuantType("q8_0", T.Q8_0, F.MOSTLY_Q8_0, 8.5),
    QuantType("q5_1", T.Q5_1, F.MOSTLY_Q5_1, 6),
    QuantType("q5_0", T.Q5_0, F.MOSTLY_Q5_0, 5.5),
    QuantType("q4_1", T.Q4_1, F.MOSTLY_Q4_1, 5),
    QuantType("q4_0", T.Q4_0, F.MOSTLY_Q4_0, 4.5),
)}
K_QUANT_HINT = ("K-quants (Q4_K_M, Q5_K_M, Q6_K, ...) need llama.cpp's own tool afterwards: export f16, then "
                "`llama-quantize model-f16.gguf model-Q4_K_M.gguf Q4_K_M`")


def encode(array: np.ndarray, quant: QuantType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Return ``array`` (float32) encoded for the file and its GGML type: float32 for 1-D tensors, ``quant``
    for matrices, float16 for a matrix whose rows ``quant``'s blocks do not divide."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim <= 1 or quant.ggml == T.F32:
        return array, T.F32
    if quant.ggml == T.F16:
        return array.astype(np.float16), T.F16
    try:
        return quantize(array, quant.ggml), quant.ggml
    except QuantError:
        return array.astype(np.float16), T.F16


def base_on_grid(weights: np.ndarray, quant: QuantType) -> bool:
    """Whether ``weights`` already lie exactly on ``quant``'s grid (a base de-quantized from a GGUF of that type):
    re-quantizing a fine-tuned copy to ``quant`` then snaps small changes back onto the base's own values."""
    if quant.ggml in (T.F32, T.F16, T.BF16) or weights.ndim != 2:
        return False
    data, kind = encode(weights, quant)
    if kind != quant.ggml:
        return False
    return bool(np.array_equal(dequantize(data, kind).reshape(weights.shape), weights))
