"""Save, load and merge a delta: ``adapter_config.json`` + ``adapter_model.safetensors`` + ``README.md``.

For methods peft also has, the two files are exactly peft's format, so ``PeftModel.from_pretrained``
and vLLM read them unchanged. What deltatune needs beyond peft's fields (its own method config, the
task, label names) travels in the safetensors header metadata under ``deltatune``, where peft does not
look; a delta written by peft itself loads too, from its peft fields. Nothing is ever unpickled.
Every file is written to a temporary name and renamed into place, so a crash leaves no half-written delta.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from deltatune.config import MethodConfig, ModelConfig, format_validation_error
from deltatune.errors import DeltatuneError
from deltatune.files import write_atomic, write_folder_atomic, write_text_atomic
from deltatune.methods import Method, build_method, method_config_class
from deltatune.models import LoadedModel, load_model
from deltatune.outputs import check_new_folder
from deltatune.quantize import dequantize_model, quantization_of

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "README.md"
_DAMAGED = "the delta is damaged: train again or copy it again"


def save_delta(
    out_dir: str | Path,
    method: Method,
    model: nn.Module,
    base_model: str,
    *,
    task: str,
    card: str | None = None,
) -> Path:
    """Write the delta of ``model`` (trained with ``method`` on ``base_model``) into ``out_dir``.

    Returns the folder. ``card`` is the model card text (README.md); ``task`` is stored so the delta
    reloads onto the right head.
    """
    out = Path(out_dir)
    # float32 on disk whatever the training precision, so a delta trained in bf16 loads anywhere
    tensors = {k: (v.detach().float() if v.is_floating_point() else v.detach()).to("cpu").contiguous()
               for k, v in method.delta_state_dict(model).items()}
    extra: dict[str, Any] = {"method": method.config.model_dump(mode="json"), "task": task}
    quantization = quantization_of(model)
    if quantization:  # the base is reloaded the same way (load_delta): the delta was trained against it
        extra["quantization"] = quantization
    id2label = getattr(model.config, "id2label", None)
    if task == "classification" and id2label:
        extra["id2label"] = {str(k): v for k, v in id2label.items()}
    metadata = {"format": "pt", "deltatune": json.dumps(extra)}
    write_atomic(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    config = method.adapter_config(model, base_model)
    write_text_atomic(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    if card is not None:
        write_text_atomic(out / CARD_FILE, card)
    return out


@dataclass
class DeltaInfo:
    """What a delta folder says about itself."""

    folder: Path
    adapter_config: dict[str, Any]
    method_config: MethodConfig
    task: str
    base_model: str
    id2label: dict[int, str] | None
    quantization: dict[str, Any] | None = None  # {"quantize", "double_quant", "compute_dtype"} or None


def read_delta_info(folder: str | Path) -> DeltaInfo:
    """Read and check a delta folder's config and metadata; raise DeltatuneError naming what is wrong."""
    path = Path(folder)
    cfg_path, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_path, weights):
        if not f.is_file():
            raise DeltatuneError(f"{f}: not found; is {path} a delta folder written by `deltatune train`?")
    adapter_config = _read_adapter_config(cfg_path)
    with _open_weights(weights) as f:
        raw_meta = (f.metadata() or {}).get("deltatune", "{}")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as err:
        raise DeltatuneError(f"{weights}: the deltatune metadata is not valid JSON ({err.msg}); {_DAMAGED}") from None
    if not isinstance(meta, dict):
        raise DeltatuneError(f"{weights}: the deltatune metadata is not a JSON object; {_DAMAGED}")
    if "method" in meta:
        method_cfg = _validate_method(meta["method"], f"{weights} (deltatune metadata)")
    else:
        method_cfg = _method_config_from_peft(adapter_config, cfg_path)
    task = meta.get("task") or ("classification" if adapter_config.get("task_type") == "SEQ_CLS" else "causal_lm")
    base = adapter_config.get("base_model_name_or_path")
    if not base:
        raise DeltatuneError(f"{cfg_path}: base_model_name_or_path is empty; set it to the base model's folder")
    id2label = {int(k): v for k, v in meta["id2label"].items()} if meta.get("id2label") else None
    quantization = meta.get("quantization") or None
    if quantization is not None and quantization.get("quantize") not in ("int8", "nf4", "fp4"):
        raise DeltatuneError(f"{weights}: unknown quantization {quantization!r} in the deltatune metadata")
    return DeltaInfo(path, adapter_config, method_cfg, task, base, id2label, quantization)


def _read_adapter_config(cfg_path: Path) -> dict[str, Any]:
    """The JSON object of ``adapter_config.json``; DeltatuneError naming the file when it is not one."""
    try:
        adapter_config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DeltatuneError(f"{cfg_path}:{err.lineno}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise DeltatuneError(f"{cfg_path}: not UTF-8 text ({err.reason}); {_DAMAGED}") from None
    except OSError as err:
        raise DeltatuneError(f"{cfg_path}: cannot read ({_os_reason(err)}); check the file's permissions") from None
    if not isinstance(adapter_config, dict):
        raise DeltatuneError(f"{cfg_path}: expected a JSON object of adapter settings (as peft writes), got a "
                             f"JSON {_json_kind(adapter_config)}; {_DAMAGED}")
    return adapter_config


def _json_kind(value: Any) -> str:
    kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _os_reason(err: OSError) -> str:
    """A short, lower-case reason for an OSError (``permission denied``, ``no such file or directory``)."""
    return (err.strerror or str(err) or type(err).__name__).lower()


@contextmanager
def _open_weights(weights: Path) -> Iterator[Any]:
    """``safe_open`` the delta's weights; a damaged or unreadable file raises DeltatuneError naming it."""
    try:
        handle = safe_open(str(weights), framework="pt")
    except SafetensorError as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0].removeprefix("Error while deserializing ")
        raise DeltatuneError(f"{weights}: not a readable safetensors file ({reason}); {_DAMAGED}") from None
    except OSError as err:
        raise DeltatuneError(f"{weights}: cannot read ({_os_reason(err)}); check the file's permissions") from None
    with handle as f:
        try:
            yield f
        except SafetensorError as err:  # a tensor whose bytes cannot be read
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            raise DeltatuneError(f"{weights}: not a readable safetensors file ({reason}); {_DAMAGED}") from None


def _validate_method(value: Any, where: str) -> MethodConfig:
    """Validate a method config read from a delta; DeltatuneError naming ``where`` and the bad key."""
    if not isinstance(value, dict):
        raise DeltatuneError(f"{where}: the method settings are not a JSON object; {_DAMAGED}")
    try:
        return method_config_class(str(value.get("name", "?"))).model_validate(value)
    except ValueError as err:  # an unknown method name, or a pydantic ValidationError (a ValueError too)
        text = format_validation_error(err, where) if isinstance(err, ValidationError) else f"{where}: {err}"
        raise DeltatuneError(text.replace("\n", "; ")) from None


def _required(adapter_config: dict[str, Any], key: str, where: Path) -> Any:
    """``adapter_config[key]``, or DeltatuneError saying the key is missing."""
    if key not in adapter_config:
        raise DeltatuneError(f"{where}: required key {key!r} is missing (peft_type "
                             f"{adapter_config.get('peft_type')} needs it); {_DAMAGED}")
    return adapter_config[key]


def _method_config_from_peft(adapter_config: dict[str, Any], where: Path) -> MethodConfig:
    peft_type = adapter_config.get("peft_type")
    if peft_type == "LORA":
        r = _required(adapter_config, "r", where)
        return _validate_method({
            "name": "lora",
            "r": r,
            "alpha": adapter_config.get("lora_alpha", r),
            "dropout": adapter_config.get("lora_dropout", 0.0),
            "targets": adapter_config.get("target_modules") or "all-linear",
            "layers": adapter_config.get("layers_to_transform"),
            "use_rslora": adapter_config.get("use_rslora", False),
            "use_dora": adapter_config.get("use_dora", False),
        }, str(where))
    if peft_type == "IA3":
        return _validate_method({
            "name": "ia3",
            "targets": adapter_config.get("target_modules") or [],
            "feedforward_targets": adapter_config.get("feedforward_modules") or [],
        }, str(where))
    # prompt methods: a peft delta holds the encoder's output, so the init and encoder options only shape
    # the (replaced) starting values; init is `random` so loading never needs peft's tokenizer path
    if peft_type == "PROMPT_TUNING":
        return _validate_method({
            "name": "prompt_tuning",
            "num_virtual_tokens": _required(adapter_config, "num_virtual_tokens", where),
            "init": "random",
        }, str(where))
    if peft_type == "P_TUNING":
        return _validate_method({
            "name": "p_tuning",
            "num_virtual_tokens": _required(adapter_config, "num_virtual_tokens", where),
            "encoder": str(adapter_config.get("encoder_reparameterization_type") or "MLP").lower(),
            "encoder_hidden_size": adapter_config.get("encoder_hidden_size"),
            "encoder_num_layers": adapter_config.get("encoder_num_layers") or 2,
            "encoder_dropout": adapter_config.get("encoder_dropout") or 0.0,
        }, str(where))
    if peft_type == "PREFIX_TUNING":
        return _validate_method({
            "name": "prefix_tuning",
            "num_virtual_tokens": _required(adapter_config, "num_virtual_tokens", where),
            "projection": bool(adapter_config.get("prefix_projection", False)),
            "encoder_hidden_size": adapter_config.get("encoder_hidden_size"),
        }, str(where))
    raise DeltatuneError(f"{where}: peft_type {peft_type!r} is not supported by this deltatune version")


def run_system_prompt(folder: str | Path) -> str | None:
    """Return the system prompt the run that wrote a delta trained with (``data.system_prompt`` in the run.yaml
    beside it), or None."""
    from deltatune.config import load_config

    run_file = Path(folder) / "run.yaml"
    return load_config(run_file).data.system_prompt if run_file.is_file() else None


def read_delta_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Return the tensors of a delta's safetensors file; DeltatuneError naming the file when it is damaged."""
    out: dict[str, torch.Tensor] = {}
    with _open_weights(Path(folder) / WEIGHTS_FILE) as f:
        for key in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
            out[key] = f.get_tensor(key)
    return out


@dataclass
class LoadedDelta:
    """A base model with a delta attached, ready for generation, eval or merge."""

    loaded: LoadedModel
    method: Method
    info: DeltaInfo


def load_delta(folder: str | Path, *, device: str = "auto", dtype: str = "auto") -> LoadedDelta:
    """Load the delta's base model (quantized as it was in training), attach the method, and load the
    trained tensors into it.

    Returns a LoadedDelta whose model computes exactly what the trained model computed.
    """
    info = read_delta_info(folder)
    tensors = read_delta_tensors(folder)
    num_labels = len(info.id2label) if info.id2label else _head_rows(info, tensors)
    quant = info.quantization or {}
    model_cfg = ModelConfig(name=info.base_model, device=device, dtype=dtype,
                            quantize=quant.get("quantize", "none"), double_quant=quant.get("double_quant"),
                            compute_dtype=quant.get("compute_dtype", "auto"))
    loaded = load_model(model_cfg, task=info.task, num_labels=num_labels, id2label=info.id2label)
    method = build_method(info.method_config)
    method.attach(loaded.model)
    try:
        method.load_delta_state_dict(loaded.model, tensors)
    except DeltatuneError as err:  # the method's message says what does not fit; name the file it came from
        raise DeltatuneError(f"{Path(folder) / WEIGHTS_FILE}: {err}") from None
    loaded.model.eval()
    return LoadedDelta(loaded, method, info)


def _head_rows(info: DeltaInfo, tensors: dict[str, torch.Tensor]) -> int | None:
    """The label count of a classifier delta written without deltatune metadata (e.g. by peft):
    the rows of its saved head (``modules_to_save``)."""
    for head in info.adapter_config.get("modules_to_save") or []:
        for key, value in tensors.items():
            if key.endswith(f".{head}.weight") and value.ndim == 2:
                return int(value.shape[0])
    return None


def merged_model(delta: LoadedDelta) -> nn.Module:
    """Fold the delta into its base's weights, in float32, and return the plain model (the same module).

    A quantized base is de-quantized first (each 4/8-bit layer becomes an ``nn.Linear`` holding exactly the
    values the quantized layer computed with). Raises the method's own DeltatuneError when it cannot merge.
    """
    if not delta.method.mergeable:
        delta.method.merge(delta.loaded.model)  # raises the method's own explanation
    # fold in float32 (then cast once): a half-precision copy would round the delta before it is added
    dequantize_model(delta.loaded.model, torch.float32)
    model = delta.method.merge(delta.loaded.model)
    return model.float()


def save_merged(delta: LoadedDelta, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Fold the delta into the base weights and write a plain model folder transformers loads alone.

    A quantized base is first de-quantized (every 4/8-bit layer becomes an ``nn.Linear`` in ``dtype``
    holding exactly the values the quantized layer computed with), so the delta folds into a normal
    model. Writes safetensors weights, config.json and the tokenizer into ``out_dir`` (via a temporary
    sibling folder renamed into place), which must be new or empty: nothing is ever written over; returns
    the folder.
    """
    out = check_new_folder(out_dir, "merge: OUT")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = merged_model(delta)
    model.to(torch_dtype)

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        delta.loaded.tokenizer.save_pretrained(str(tmp))

    return write_folder_atomic(out, write, replace=False)
