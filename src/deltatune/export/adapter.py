"""A LoRA delta alone as a llama.cpp adapter GGUF: ``llama-cli -m base.gguf --lora adapter.gguf``.

The format is the one llama.cpp's ``convert_lora_to_gguf.py`` writes: ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha``, and for each adapted weight ``W`` (GGUF name ``blk.N.attn_q
.weight``) two tensors, ``W.lora_a`` = A (r, in) and ``W.lora_b`` = B (out, r). llama.cpp adds
``alpha / r * B @ A`` to ``W``, so rsLoRA's scale ``alpha / sqrt(r)`` is written as the alpha ``alpha * sqrt(r)``.
Where the base's query/key rows are reordered for llama.cpp's rope (see ``arch``), B's rows are reordered the
same way; A is untouched. DoRA (a per-column magnitude) and every other method have no place in the format.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf

from deltatune.errors import DeltatuneError
from deltatune.export.arch import CAUSAL_LM_OF_TYPE, spec_for
from deltatune.export.files import GGUFTarget, write_gguf
from deltatune.export.tensors import QuantType, encode

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
PEFT_PREFIX = "base_model.model."


def write_lora_adapter(folder: Path, target: GGUFTarget, qtype: QuantType, *, base: str | None
                       ) -> tuple[dict[str, int], Any, str | None]:
    """Write the LoRA delta in ``folder`` as an adapter GGUF at ``target``; return (tensor counts by GGML
    type, the base's tokenizer, the run's system prompt). Raises DeltatuneError for a
    delta that is not plain LoRA on a causal LM of a supported architecture."""
    from transformers import AutoConfig, AutoTokenizer

    from deltatune.delta import read_delta_info, read_delta_tensors, run_system_prompt
    from deltatune.models import hub_kwargs, resolve_source

    info = read_delta_info(folder)
    method = info.method_config
    if method.name != "lora" or getattr(method, "use_dora", False):
        kind = "a DoRA" if method.name == "lora" else f"a {method.name}"
        raise DeltatuneError(f"export --adapter-only: {folder} is {kind} delta; llama.cpp's adapter format holds "
                             "plain LoRA only (A and B per weight). Export the merged model instead (drop "
                             "--adapter-only)")
    if info.task != "causal_lm":
        raise DeltatuneError(f"export --adapter-only: {folder} is a {info.task} delta; adapters export for causal "
                             "language models only")
    source = resolve_source(base or info.base_model)
    config = AutoConfig.from_pretrained(source, **hub_kwargs(source))
    hf_arch = next(iter(config.architectures or []), CAUSAL_LM_OF_TYPE.get(config.model_type, config.model_type))
    spec = spec_for(hf_arch, config)
    tensors = read_delta_tensors(folder)
    pairs = _lora_pairs(tensors, folder)
    scale = method.alpha / (math.sqrt(method.r) if method.use_rslora else method.r)
    alpha = scale * method.r
    kinds: dict[str, int] = {}

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(folder.resolve().name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for hf_name, (a, b) in pairs.items():
            name = spec.gguf_name(hf_name)
            for suffix, tensor in ((".lora_a", a), (".lora_b", spec.gguf_layout(hf_name, b))):
                data, kind = encode(tensor.float().numpy(), qtype)
                writer.add_tensor(name + suffix, data, raw_dtype=kind)
                kinds[kind.name] = kinds.get(kind.name, 0) + 1

    write_gguf(target, spec.name, fill)
    tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs(source))
    return kinds, tokenizer, run_system_prompt(folder)


def _lora_pairs(tensors: dict[str, Any], folder: Path) -> dict[str, tuple[Any, Any]]:
    """Map each adapted weight's transformers name to its (A, B); refuse tensors that are not LoRA's A and B."""
    pairs: dict[str, tuple[Any, Any]] = {}
    for key in sorted(tensors):
        if key.endswith(LORA_B):
            continue
        if not key.endswith(LORA_A):
            raise DeltatuneError(f"export --adapter-only: {folder} holds {key}, which llama.cpp's adapter format has "
                                 "no place for (only LoRA's A and B); export the merged model instead")
        module = key[: -len(LORA_A)]
        b_key = module + LORA_B
        if b_key not in tensors:
            raise DeltatuneError(f"export --adapter-only: {folder}: {key} has no {b_key}; the delta is damaged")
        pairs[module.removeprefix(PEFT_PREFIX) + ".weight"] = (tensors[key], tensors[b_key])
    if not pairs:
        raise DeltatuneError(f"export --adapter-only: {folder} holds no LoRA tensors")
    return pairs
