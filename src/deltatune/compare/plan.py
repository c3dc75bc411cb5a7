"""Turn a compare file (a run config plus a ``compare:`` section) into one validated RunConfig per method.

    plan = load_plan("run.yaml", ["train.max_steps=50"], methods=["lora", "ia3"])
    for item in plan.methods:
        print(item.key, item.lr, item.config.output.dir)

Every method gets the same data, the same seed and batch plan (so the same examples in the same order)
and the same budget. Per method, the run config's ``method`` section applies only to the method it names;
others start from their own defaults; ``compare.overrides.<method>`` is merged over that. ``train.lr``
is left unset so each method trains at its recommended rate unless the file sets one.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltatune.compare.settings import ALIASES, CompareSettings, all_methods, parse_settings
from deltatune.config import RunConfig, config_from_dict, read_config_tree
from deltatune.errors import ConfigError
from deltatune.outputs import check_output_path

DEFAULT_OUT = "runs/compare"
BUDGET_KEYS = ("seed", "batch_size", "grad_accum", "epochs", "max_steps", "max_seconds")


@dataclass
class MethodPlan:
    """One method of a comparison: its compare name, its resolved run config and its learning rates."""

    key: str
    config: RunConfig
    lr: float
    head_lr: float | None
    planned_steps: int

    @property
    def out(self) -> Path:
        """The method's output folder (``<compare out>/<key>``)."""
        return Path(self.config.output.dir)

    def config_json(self) -> dict[str, Any]:
        """Return the resolved config as plain JSON data (what compare.json records and compares)."""
        return json.loads(self.config.model_dump_json())


@dataclass
class ComparePlan:
    """Everything a comparison runs: the methods, where it writes, and what the data and budget are."""

    out: Path
    source: str
    settings: CompareSettings
    methods: list[MethodPlan]
    task: str
    n_train: int
    n_eval: int
    metric: str | None  # "accuracy", "exact_match", "reward_accuracy" or None (eval loss is then the criterion)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """Return the shared settings of the run (model, data, budget, seed) as plain data."""
        cfg = self.methods[0].config if self.methods else None
        if cfg is None:
            return {}
        t = cfg.train
        return {"model": cfg.model.name, "task": self.task, "data_train": cfg.data.train,
                "data_eval": cfg.data.eval, "train_examples": self.n_train, "eval_examples": self.n_eval,
                "max_length": cfg.data.max_length, "batching": cfg.data.batching, "seed": t.seed,
                "batch_size": t.batch_size, "grad_accum": t.grad_accum,
                "epochs": None if t.max_steps else t.epochs, "max_steps": t.max_steps,
                "max_seconds": t.max_seconds, "planned_steps": self.methods[0].planned_steps,
                "metric": self.metric}


def read_tree(path: str | Path | None, overrides: list[str] | None) -> tuple[dict[str, Any], str]:
    """Read a YAML file (or nothing) and apply ``key=value`` overrides (``compare.*`` keys too); return the
    raw tree and a source name for messages. Raises ConfigError naming the file, line or override."""
    return read_config_tree(path, overrides, sections="model, data, method, train, output, compare")


def merge_tree(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``extra`` merged in, section by section (nested mappings merge, values replace)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_tree(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def select_methods(requested: list[str] | None, known: list[str], quant_available: Callable[[], bool]) -> list[str]:
    """Return the methods to compare: ``requested`` (``["all"]`` or None: every method but compose, qlora only
    when ``quant_available()``), checked against the ``known`` names (registered methods and aliases); raise
    ConfigError on an unknown or repeated name."""
    if requested is None or requested == ["all"]:
        return all_methods([k for k in known if k not in ALIASES], quant_available())
    if not requested:
        raise ConfigError("compare: no methods given; name some (e.g. lora,ia3) or all")
    seen: list[str] = []
    for name in requested:
        if name not in known:
            raise ConfigError(f"compare: unknown method {name!r}; choose from {', '.join(sorted(known))}, or all")
        if name in seen:
            raise ConfigError(f"compare: method {name!r} is listed twice")
        seen.append(name)
    return seen


def _method_section(key: str, base_method: Any) -> Any:
    """The method section for ``key``: the run config's own section if it names this method, else the
    method's defaults (an alias's options for ``dora``)."""
    base_name = base_method.get("name", "lora") if isinstance(base_method, dict) else \
        "compose" if isinstance(base_method, list) else None
    if base_method is not None and base_name == key and key not in ALIASES:
        return copy.deepcopy(base_method)
    return copy.deepcopy(ALIASES.get(key, {"name": key}))


def load_plan(path: str | Path | None, overrides: list[str] | None = None, *, methods: list[str] | None = None,
              out: str | Path | None = None) -> ComparePlan:
    """Read a compare file with overrides and return the plan: one validated config per method.

    ``methods`` (e.g. from ``--methods``) wins over ``compare.methods``; ``out`` wins over ``output.dir``
    (default ``runs/compare``). The data is read and checked here, before anything trains. Raises
    ConfigError naming the file and key of any problem.
    """
    tree, source = read_tree(path, overrides)
    return plan_from_tree(tree, source, methods=methods, out=out)


def plan_from_tree(tree: dict[str, Any], source: str = "config", *, methods: list[str] | None = None,
                   out: str | Path | None = None) -> ComparePlan:
    """Return the plan for a raw config tree holding an optional ``compare:`` section (see load_plan)."""
    from deltatune.evaluate import has_tool_calls, reference_pairs
    from deltatune.methods import registered_methods
    from deltatune.training.optim import peak_learning_rates
    from deltatune.training.setup import load_run_data
    from deltatune.training.shape import run_shape

    tree = copy.deepcopy(tree)
    settings = parse_settings(tree.pop("compare", None), source)
    base_method = tree.pop("method", None)
    output = tree.pop("output", None) or {}
    if out is not None:
        out_dir = check_output_path(out, "--out")
    elif isinstance(output, dict) and "dir" in output:  # given, maybe as an empty value (`output.dir=`)
        out_dir = check_output_path(str(output["dir"] or ""), "output.dir")
    else:
        out_dir = Path(DEFAULT_OUT)
    base_cfg = config_from_dict(tree, source)  # every section but method, checked once
    if base_cfg.data.train is None:
        raise ConfigError(f"{source}: data.train: compare needs training data (a file or hub:NAME); the built-in "
                          "demo is for `deltatune train`")

    known = [*registered_methods(), *ALIASES]
    chosen = select_methods(methods if methods is not None else settings.methods, known, _bitsandbytes_imports)
    for name in settings.overrides:
        if name not in known:
            raise ConfigError(f"{source}: compare.overrides.{name}: unknown method; choose from "
                              f"{', '.join(sorted(known))}")
    notes = [f"compare.overrides.{n} is not used: {n} is not among the compared methods"
             for n in settings.overrides if n not in chosen]
    raw_train = tree.get("train") or {}
    if isinstance(raw_train, dict) and raw_train.get("lr") is not None:
        notes.append(f"train.lr={raw_train['lr']} in {source} applies to every method (their recommended rates "
                     "are not used); set compare.overrides.<method>.train.lr to give one method its own")
    if isinstance(base_method, dict) and len(base_method) > 1:
        notes.append(f"the method section of {source} configures {base_method.get('name', 'lora')} only; the other "
                     "methods use their defaults and compare.overrides")

    data = load_run_data(base_cfg, out_dir)  # checks every data line before anything trains
    has_refs = data.task == "causal_lm" and bool(reference_pairs(data.eval))
    tools = has_tool_calls(data.eval)
    metric = ("reward_accuracy" if data.pairs else "accuracy" if data.task == "classification"
              else "tool_call_accuracy" if tools else "exact_match" if has_refs else None)
    has_refs = has_refs or tools  # tool calls are compared by generating, as exact match is

    plans: list[MethodPlan] = []
    for key in chosen:
        extra = settings.overrides.get(key, {})
        m_tree = merge_tree(tree, {k: v for k, v in extra.items() if k != "method"})
        m_tree["method"] = _method_section(key, base_method)
        if "method" in extra:
            given = extra["method"].get("name")
            if given is not None and given != m_tree["method"].get("name"):
                raise ConfigError(f"{source}: compare.overrides.{key}.method.name: {given!r} is not {key}; the "
                                  "override of a method cannot change which method it is")
            m_tree["method"] = merge_tree(m_tree["method"], extra["method"])
        train = m_tree.setdefault("train", {})
        for k in BUDGET_KEYS:
            if k in extra.get("train", {}):
                notes.append(f"compare.overrides.{key} sets train.{k}: {key} does not run on the same "
                             "budget or example order as the others")
        if settings.max_seconds and train.get("max_seconds") is None:
            train["max_seconds"] = settings.max_seconds
        if has_refs and "eval_generations" not in train:
            train["eval_generations"] = settings.eval_generations
        m_tree["output"] = {"dir": str(out_dir / key), "overwrite": True}
        where = f"{source} (method {key}{', with compare.overrides.' + key if key in settings.overrides else ''})"
        cfg = config_from_dict(m_tree, where)
        steps = run_shape(cfg, task=data.task, examples=len(data.train)).total_steps  # the loop's own rule
        if data.eval and "eval_every" not in train:
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
                update={"eval_every": max(1, math.ceil(steps / settings.eval_points))})})
        lr, head_lr = peak_learning_rates(cfg.train, cfg.method, data.task)
        plans.append(MethodPlan(key, cfg, lr, head_lr if data.task == "classification" else None, steps))
    return ComparePlan(out_dir, source, settings, plans, data.task, len(data.train), len(data.eval), metric, notes)


def _bitsandbytes_imports() -> bool:
    """Return True when bitsandbytes imports (qlora can run)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True
