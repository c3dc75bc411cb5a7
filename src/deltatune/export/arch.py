"""Which transformers architectures become which GGUF architecture, with their hyper-parameters and tensor names.

    spec = arch_spec(model)               # refuses, naming what is supported, anything else
    spec.write_hparams(writer)            # llama.context_length, llama.attention.head_count, ...
    name = spec.gguf_name("model.layers.0.self_attn.q_proj.weight")      # blk.0.attn_q.weight
    tensor = spec.gguf_layout("model.layers.0.self_attn.q_proj.weight", tensor)

Llama, SmolLM and Mistral are llama.cpp's ``llama`` architecture; Qwen2 is ``qwen2``. llama.cpp's ``llama``
rotates query/key pairs that are adjacent (GPT-J style) where transformers' Llama rotates the two halves of
each head (``rotate_half``), so the rows of ``q_proj``/``k_proj`` are reordered per head: within each head,
row ``i`` of the first half and row ``i`` of the second half become rows ``2i`` and ``2i+1``. ``qwen2`` uses
the halves layout (NEOX) in llama.cpp too, so its weights go as they are. Tensor names come from the
``gguf`` package's own map, the one llama.cpp's converter and transformers' GGUF reader use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gguf
import torch

from deltatune.errors import DeltatuneError

# transformers architecture -> (gguf architecture, whether q/k rows are reordered for llama.cpp's rope)
SUPPORTED = {
    "LlamaForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": (gguf.MODEL_ARCH.QWEN2, False),
}
SUPPORTED_TEXT = "Llama (and SmolLM), Mistral and Qwen2 causal LMs"
# a config.json without `architectures` (the bundled model's converted copy) names only its model type
CAUSAL_LM_OF_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass
class ArchSpec:
    """How one model's config maps to GGUF: the architecture, its hyper-parameters, its tensor names."""

    hf_arch: str
    arch: gguf.MODEL_ARCH
    permute_qk: bool
    config: Any

    @property
    def name(self) -> str:
        """The GGUF architecture name (``llama``, ``qwen2``)."""
        return gguf.MODEL_ARCH_NAMES[self.arch]

    @property
    def head_dim(self) -> int:
        """The size of one attention head."""
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        """The number of key/value heads."""
        return self.config.num_key_value_heads or self.config.num_attention_heads

    def write_hparams(self, writer: gguf.GGUFWriter) -> None:
        """Add the architecture's hyper-parameters to ``writer``."""
        c = self.config
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(c.hidden_size)
        writer.add_block_count(c.num_hidden_layers)
        writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count(c.num_attention_heads)
        writer.add_head_count_kv(self.n_kv_heads)
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
        writer.add_rope_freq_base(float(_rope_theta(c)))
        writer.add_rope_dimension_count(self.head_dim)
        writer.add_vocab_size(c.vocab_size)
        if self.head_dim != c.hidden_size // c.num_attention_heads:
            writer.add_key_length(self.head_dim)
            writer.add_value_length(self.head_dim)
        scaling = _rope_scaling(c)
        kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
        if kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(scaling["factor"]))

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors llama.cpp needs that the checkpoint does not hold: Llama 3's per-frequency rope factors."""
        scaling = _rope_scaling(self.config)
        if not scaling or (scaling.get("rope_type") or scaling.get("type")) != "llama3":
            return {}
        return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": llama3_rope_factors(
            float(_rope_theta(self.config)), self.head_dim, scaling)}

    def gguf_name(self, hf_name: str) -> str:
        """Return the GGUF name of a transformers tensor; raise DeltatuneError for one the map does not know."""
        table = gguf.get_tensor_name_map(self.arch, self.config.num_hidden_layers)
        name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise DeltatuneError(f"export: no GGUF name for the tensor {hf_name} of this {self.hf_arch}; it is not "
                                 "a plain model of that architecture")
        return name

    def gguf_layout(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Return ``tensor`` in the layout llama.cpp expects (q/k rows reordered for the llama architecture)."""
        if not self.permute_qk:
            return tensor
        if hf_name.endswith("self_attn.q_proj.weight") or hf_name.endswith("self_attn.q_proj.bias"):
            return interleave_rope_rows(tensor, self.config.num_attention_heads)
        if hf_name.endswith("self_attn.k_proj.weight") or hf_name.endswith("self_attn.k_proj.bias"):
            return interleave_rope_rows(tensor, self.n_kv_heads)
        return tensor


def interleave_rope_rows(tensor: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a query or key projection (out, ...) from transformers' halves layout to llama.cpp's
    pairs: per head, the rows (h0, h1 | k0, k1) become (h0, k0, h1, k1)."""
    rows = tensor.shape[0]
    return (tensor.reshape(n_heads, 2, rows // n_heads // 2, *tensor.shape[1:])
            .transpose(1, 2).reshape(tensor.shape))


def llama3_rope_factors(theta: float, head_dim: int, scaling: dict[str, Any]) -> torch.Tensor:
    """Return Llama 3.1's rope factor per frequency (head_dim / 2,): 1 for high frequencies, ``factor`` for low
    ones, a smooth blend between (Meta's published scaling rule, as llama.cpp reads it from ``rope_freqs``)."""
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _rope_scaling(config: Any) -> dict[str, Any] | None:
    scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None)
    if not isinstance(scaling, dict):
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    return None if kind in (None, "default") else scaling


def _rope_theta(config: Any) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None and isinstance(getattr(config, "rope_parameters", None), dict):
        theta = config.rope_parameters.get("rope_theta")
    return float(theta or 10000.0)


def arch_spec(model: torch.nn.Module) -> ArchSpec:
    """Return the GGUF mapping of a transformers model (by its class: a classifier built on a Llama is not a
    Llama LM); raise DeltatuneError naming the architecture and what is supported when there is none."""
    return spec_for(type(model).__name__, model.config)


def spec_for(hf_arch: str, config: Any) -> ArchSpec:
    """Return the GGUF mapping of transformers class ``hf_arch`` with ``config`` (see :func:`arch_spec`)."""
    if hf_arch not in SUPPORTED:
        raise DeltatuneError(f"export: {hf_arch} cannot be written as GGUF by deltatune; it exports "
                             f"{SUPPORTED_TEXT}")
    scaling = _rope_scaling(config)
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if kind not in (None, "linear", "llama3"):
        raise DeltatuneError(f"export: rope scaling {kind!r} of this {hf_arch} is not supported (none, linear "
                             "and llama3 are)")
    arch, permute = SUPPORTED[hf_arch]
    return ArchSpec(hf_arch, arch, permute, config)
