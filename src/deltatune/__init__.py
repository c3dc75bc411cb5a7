"""deltatune: fine-tune pre-trained language models with one CLI, one Python API and peft-compatible deltas.

    import deltatune as dt
    loaded = dt.load_model(dt.ModelConfig(name="default"))
    method = dt.attach(loaded.model, {"name": "lora", "r": 8})
    ...
    dt.save_delta("out", method, loaded.model, loaded.source, task=loaded.task)
    delta = dt.load_delta("out")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deltatune.config import MethodConfig, ModelConfig, RunConfig, config_from_dict, dump_config, load_config
from deltatune.delta import LoadedDelta, load_delta, save_delta, save_merged
from deltatune.errors import ConfigError, DataError, DeltatuneError
from deltatune.methods import Method, build_method, method_config_class
from deltatune.models import LoadedModel, load_model
from deltatune.training.callbacks import Callback

__version__ = "0.1.0"


def attach(model: Any, method: MethodConfig | dict[str, Any] | str) -> Method:
    """Attach a method to ``model`` in place (freezing the base); return the Method to save or merge with.

    ``method`` is a method config, a dict such as ``{"name": "lora", "r": 8}``, or a method name.
    """
    if isinstance(method, str):
        method = {"name": method}
    if isinstance(method, dict):
        method = method_config_class(str(method.get("name", "lora"))).model_validate(method)
    built = build_method(method)
    built.attach(model)
    return built


def merge(model: Any, method: Method) -> Any:
    """Fold ``method``'s delta into the weights of ``model``; return the plain model."""
    return method.merge(model)


def train(cfg: RunConfig, *, resume: bool = False, progress: bool = True, callbacks: Sequence[Callback] = ()) -> Any:
    """Run training for ``cfg`` and write the delta to ``cfg.output.dir``; return the TrainResult. ``callbacks``
    (:class:`Callback` subclasses) are called around the loop after the built-in ones."""
    from deltatune.training.loop import train as _train

    return _train(cfg, resume=resume, progress=progress, callbacks=callbacks)


def compare_methods(path: Any, overrides: list[str] | None = None, **options: Any) -> Any:
    """Train several methods on the same data and budget, each in its own process, and write report.md,
    results.json and charts; return the CompareResult (see ``deltatune.compare.compare`` for the options)."""
    from deltatune.compare import compare

    return compare(path, overrides, **options)


def export_gguf(delta: Any, out: Any, **options: Any) -> Any:
    """Write base + delta (merged), a base alone (``base=``) or a LoRA delta alone (``adapter_only=True``) as a
    GGUF file for llama.cpp and Ollama; return the ExportResult (see ``deltatune.export.export_gguf``)."""
    from deltatune.export import export_gguf as _export

    return _export(delta, out, **options)


def serve(deltas: Any, **options: Any) -> Any:
    """Serve deltas ({name: folder}) on one base over the OpenAI API; with ``background=True`` return a running
    handle (``.url``, ``.stop()``), else block until stopped (see ``deltatune.serving.serve`` for the options)."""
    from deltatune.serving import serve as _serve

    return _serve(deltas, **options)


__all__ = [
    "Callback",
    "ConfigError",
    "DataError",
    "DeltatuneError",
    "LoadedDelta",
    "LoadedModel",
    "Method",
    "MethodConfig",
    "ModelConfig",
    "RunConfig",
    "attach",
    "compare_methods",
    "config_from_dict",
    "dump_config",
    "export_gguf",
    "load_config",
    "load_delta",
    "load_model",
    "merge",
    "save_delta",
    "save_merged",
    "serve",
    "train",
]
