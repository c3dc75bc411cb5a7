"""Fine-tuning methods: one module per family, each registered once by name."""

from deltatune.methods import adapters as _adapters  # noqa: F401  (registers `adapter`)
from deltatune.methods import compose as _compose  # noqa: F401  (registers `compose`)
from deltatune.methods import full as _full  # noqa: F401  (registers `full`)
from deltatune.methods import hiwi as _hiwi  # noqa: F401  (registers `hiwi`)
from deltatune.methods import ia3 as _ia3  # noqa: F401  (registers `ia3`)
from deltatune.methods import lora as _lora  # noqa: F401  (registers `lora`)
from deltatune.methods import prompts as _prompts  # noqa: F401  (registers the prompt methods)
from deltatune.methods import selective as _selective  # noqa: F401  (registers `freeze`, `bitfit`)
from deltatune.methods import sparse as _sparse  # noqa: F401  (registers `diff_pruning`, `pafi`)
from deltatune.methods.base import (
    Method,
    build_method,
    find_targets,
    head_names,
    method_class,
    method_config_class,
    register_method,
    registered_methods,
    trainable_parameters,
)

__all__ = [
    "Method",
    "build_method",
    "find_targets",
    "head_names",
    "method_class",
    "method_config_class",
    "register_method",
    "registered_methods",
    "trainable_parameters",
]
