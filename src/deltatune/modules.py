"""Finding a model's modules: its output head(s), and the modules a method added (marked, so that another method
never targets them). The foundation under methods, quantization and loading: none of these imports a method."""

from __future__ import annotations

from torch import nn


def output_layer_names(model: nn.Module) -> set[str]:
    """Return the qualified names of the model's output head(s): never targets of `all-linear`."""
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if out is not None and module is out:
            names.add(name)
        if name.split(".")[-1] in {"lm_head", "classifier", "score", "qa_outputs"}:
            names.add(name)
    return names


ADDED = "_deltatune_added"
"""Attribute set on every module a method adds, so that a second method (``compose``) never targets it."""


def mark_added(module: nn.Module, keep: nn.Module | None = None) -> None:
    """Mark ``module`` and its submodules as added by a method, except ``keep``'s subtree (the wrapped
    base layer, which stays a target for other methods)."""
    kept = {id(m) for m in keep.modules()} if keep is not None else set()
    for m in module.modules():
        if id(m) not in kept:
            setattr(m, ADDED, True)


def base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return ``(name, module)`` for the model's own modules (wrapped ones included, under their new
    names such as ``q_proj.base_layer``), leaving out every module a method added."""
    return [(n, m) for n, m in model.named_modules() if not getattr(m, ADDED, False)]
