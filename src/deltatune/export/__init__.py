"""``deltatune export``: a fine-tuned model (base + delta, merged) or a base alone as one GGUF file for llama.cpp
and Ollama, or a LoRA delta alone as a llama.cpp adapter GGUF; optionally an Ollama Modelfile beside it.

    export_gguf("runs/demo", "model.gguf", quant="q8_0", ollama=True)    # merged, 8-bit, + Modelfile
    export_gguf(None, "base.gguf", base="default", quant="f16")          # the base alone
    export_gguf("runs/demo", "adapter.gguf", adapter_only=True)           # llama-cli -m base.gguf --lora ...

Modules, one job each: ``arch`` (architectures, hyper-parameters, tensor names and layout), ``vocab`` (the
tokenizer), ``tensors`` (GGUF types and quantizers), ``adapter`` (the LoRA adapter file), ``modelfile``
(Ollama). Everything is written in pure Python with the ``gguf`` package; no llama.cpp build is needed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import torch

from deltatune.delta import run_system_prompt
from deltatune.errors import DeltatuneError
from deltatune.export.arch import arch_spec
from deltatune.export.files import GGUFTarget, write_gguf
from deltatune.export.modelfile import chat_format, modelfile
from deltatune.export.tensors import K_QUANT_HINT, QUANTS, QuantType, base_on_grid, encode
from deltatune.export.vocab import write_vocab


@dataclass
class ExportResult:
    """What an export wrote and measured."""

    path: Path
    quant: str
    bytes: int
    seconds: float
    tensors: int
    kinds: dict[str, int] = field(default_factory=dict)  # GGML type name -> how many tensors
    modelfile: Path | None = None


def quant_type(name: str) -> QuantType:
    """Return the ``--quant`` choice ``name``; raise DeltatuneError listing the choices for an unknown one."""
    if name.lower() not in QUANTS:
        raise DeltatuneError(f"--quant: unknown type {name!r}; choose one of {', '.join(QUANTS)}. {K_QUANT_HINT}")
    return QUANTS[name.lower()]


def export_gguf(delta: str | Path | None, out: str | Path, *, base: str | None = None, quant: str | None = None,
                adapter_only: bool = False, ollama: bool = False, force: bool = False,
                say: Callable[[str], None] = print) -> ExportResult:
    """Write a GGUF file to ``out`` and return what was written.

    With a ``delta`` folder: its base with the delta folded in (``adapter_only``: the LoRA delta alone, in
    llama.cpp's adapter format). With ``base`` and no delta: that base model alone (any ``model.name``).
    ``quant`` is one of ``QUANTS`` (default ``q8_0``; ``f16`` for an adapter). With ``ollama`` a ``Modelfile``
    is written beside the file. ``out`` (and the Modelfile) must not exist, unless ``force`` and it is a GGUF
    file (a Modelfile deltatune wrote); the file appears complete or not at all.
    """
    started = time.perf_counter()
    qtype = quant_type(quant or ("f16" if adapter_only else "q8_0"))
    target = GGUFTarget.check(out, force=force)
    side = target.path.parent / "Modelfile" if ollama else None
    if side is not None:
        GGUFTarget.check_modelfile(side, force=force)
    if delta is None:
        if base is None:
            raise DeltatuneError("export: give a delta folder (the output.dir of a training run), or --base MODEL "
                                 "to export a base model alone")
        if adapter_only:
            raise DeltatuneError("export --adapter-only: give the delta folder whose adapter to export")
        model, tokenizer, name, system = _load_base(base)
    elif adapter_only:
        from deltatune.export.adapter import write_lora_adapter

        kinds, tokenizer, system = write_lora_adapter(Path(delta), target, qtype, base=base)
        return _finish(target, qtype, kinds, started, side, tokenizer, system, adapter=True, say=say)
    else:
        model, tokenizer, name, system = _load_merged(Path(delta), base)
    spec = arch_spec(model)
    if delta is not None:
        _warn_if_base_on_grid(Path(delta), qtype, say)
    say(f"writing {spec.name} GGUF ({qtype.name}) to {target.path}")
    kinds: dict[str, int] = {}

    def write(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(qtype.file_type)
        if qtype.ggml not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        spec.write_hparams(writer)
        write_vocab(writer, tokenizer, model.config.vocab_size)
        for hf_name, tensor in _model_tensors(model):
            data, kind = encode(spec.gguf_layout(hf_name, tensor).numpy(), qtype)
            writer.add_tensor(spec.gguf_name(hf_name), data, raw_dtype=kind)
            kinds[kind.name] = kinds.get(kind.name, 0) + 1
        for gguf_name, tensor in spec.extra_tensors().items():
            writer.add_tensor(gguf_name, tensor.numpy())
            kinds["F32"] = kinds.get("F32", 0) + 1

    write_gguf(target, spec.name, write)
    return _finish(target, qtype, kinds, started, side, tokenizer, system, say=say)


def _finish(target: GGUFTarget, qtype: QuantType, kinds: dict[str, int], started: float, side: Path | None,
            tokenizer: Any, system: str | None, *, adapter: bool = False,
            say: Callable[[str], None]) -> ExportResult:
    size = target.path.stat().st_size
    result = ExportResult(target.path, qtype.name, size, time.perf_counter() - started, sum(kinds.values()), kinds)
    say(f"wrote {target.path} ({size / 1e6:.1f} MB, {result.tensors} tensors: "
        + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + f") in {result.seconds:.1f} s")
    if side is not None:
        fmt, default_system = chat_format(tokenizer)
        if adapter:  # Ollama needs the base's GGUF too
            text = modelfile("./base.gguf", fmt, system=system or default_system, adapter=f"./{target.path.name}")
        else:
            text = modelfile(f"./{target.path.name}", fmt, system=system or default_system)
        GGUFTarget.write_modelfile(side, text)
        result.modelfile = side
        extra = (" (FROM ./base.gguf: export the base beside it with `deltatune export --base ... -o "
                 f"{target.path.parent / 'base.gguf'}`)") if adapter else ""
        say(f"wrote {side} ({fmt.name} prompt format){extra}; `ollama create NAME -f {side}`")
    if qtype.name in ("f32", "f16", "bf16") and not adapter:
        stem = target.path.with_suffix("")
        say(f"for a K-quant: llama-quantize {target.path} {stem}-Q4_K_M.gguf Q4_K_M (llama.cpp's tool)")
    return result


def _warn_if_base_on_grid(folder: Path, qtype: QuantType, say: Callable[[str], None]) -> None:
    """Warn when the delta's base weights already lie on ``qtype``'s grid (checked on one matrix of the base's
    own file): a fine-tune re-quantized to the type its base was distributed in loses most of its delta."""
    from safetensors import safe_open

    from deltatune.delta import read_delta_info
    from deltatune.models import resolve_source

    files = sorted(Path(resolve_source(read_delta_info(folder).base_model)).glob("*.safetensors"))
    if not files or qtype.ggml in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return
    with safe_open(str(files[0]), framework="pt") as f:
        name = next((k for k in f.keys() if k.endswith("mlp.down_proj.weight")), None)  # noqa: SIM118
        if name is None or not base_on_grid(f.get_tensor(name).float().numpy(), qtype):
            return
    say(f"warning: the base's weights already lie exactly on {qtype.name}'s grid (it was distributed in that "
        f"type): a {qtype.name} export rounds most of a fine-tune back onto the base's own values. Prefer q8_0, "
        "or another 4/5-bit type (README: Export figures)")


def _model_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's tensors to write, by transformers name, float32 on the CPU (a tied output layer once)."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    out = []
    for name, tensor in model.state_dict().items():
        if (tied and name == "lm_head.weight") or "rotary_emb" in name:
            continue
        out.append((name, tensor.detach().to("cpu", torch.float32)))
    return out


def _load_base(name: str) -> tuple[torch.nn.Module, Any, str, str | None]:
    from deltatune.config import ModelConfig
    from deltatune.models import load_model

    loaded = load_model(ModelConfig(name=name, device="cpu", dtype="float32"), task="causal_lm")
    return loaded.model, loaded.tokenizer, Path(loaded.source).name or name, None


def _load_merged(folder: Path, base: str | None) -> tuple[torch.nn.Module, Any, str, str | None]:
    from deltatune.delta import load_delta, merged_model, read_delta_info
    from deltatune.methods import build_method, method_class, registered_methods

    info = read_delta_info(folder)
    if info.task != "causal_lm":
        raise DeltatuneError(f"export: {folder} is a {info.task} delta; GGUF export is for causal language models")
    if not build_method(info.method_config).mergeable:
        exporting = sorted(n for n in registered_methods() if method_class(n).mergeable)
        raise DeltatuneError(f"export: {folder} is a {info.method_config.name} delta, which changes the model's "
                             "input or adds modules that cannot be folded into plain weights, so llama.cpp cannot "
                             f"run it; the methods that export are {', '.join(exporting)}")
    if base is not None:
        raise DeltatuneError("export: --base names the model to export alone; a delta is exported onto the base it "
                             "was trained on (its adapter_config.json)")
    delta = load_delta(folder, device="cpu", dtype="float32")
    return merged_model(delta), delta.loaded.tokenizer, folder.resolve().name, run_system_prompt(folder)


__all__ = ["QUANTS", "ExportResult", "export_gguf", "quant_type"]
