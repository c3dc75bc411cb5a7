"""Fine-tuning methods: one module per family, each registered once by name."""

from deltatune.methods import lora as _lora  # noqa: F401  (registers `lora`)
from deltatune.methods.base import (
    Method,
    build_method,
    find_targets,
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
    "method_class",
    "method_config_class",
    "register_method",
    "registered_methods",
    "trainable_parameters",
]
