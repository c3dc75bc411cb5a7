"""The ``compare:`` section of a compare file, and what ``--methods all`` means.

    compare:
      methods: [lora, ia3, bitfit]     # or "all", or "lora,ia3"; --methods on the command line wins
      max_seconds: 600                 # a wall-clock budget per method (train.max_seconds)
      overrides:                       # per-method sections merged over the run config
        lora: {method: {r: 16}, train: {lr: 1.0e-3}}

The section is stripped from the file before the rest is validated as a RunConfig.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deltatune.errors import ConfigError

ALIASES: dict[str, dict[str, Any]] = {"dora": {"name": "lora", "use_dora": True}}
"""Compare names that are another method with options: ``dora`` is LoRA with ``use_dora: true``."""

ALL_ORDER = ("full", "freeze", "bitfit", "diff_pruning", "pafi", "prompt_tuning", "p_tuning", "prefix_tuning",
             "adapter", "lora", "dora", "ia3", "hiwi", "qlora")
"""The order of ``--methods all`` (every registered method but ``compose``; ``qlora`` only when bitsandbytes
imports); methods registered later are appended."""

ALL_HELP = ("all = " + ", ".join(ALL_ORDER) + " (dora is lora with use_dora; qlora only when bitsandbytes is "
            "installed; compose is never included)")

OVERRIDE_SECTIONS = ("model", "method", "train")
"""Sections a per-method override may set: data and output are shared by every method."""


class CompareSettings(BaseModel):
    """The ``compare:`` section: which methods, the time budget, per-method overrides, measurement settings."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    methods: list[str] | None = None
    """Methods to compare (a list, a comma-separated string, or `all`); null: every method but compose.
    `--methods` on the command line wins."""
    max_seconds: float | None = Field(default=None, gt=0)
    """Wall-clock budget of each method's step loop (sets train.max_seconds where it is not set)."""
    overrides: dict[str, dict[str, dict[str, Any]]] = Field(default_factory=dict)
    """Per method: sections merged over the run config, e.g. `lora: {method: {r: 16}, train: {lr: 1e-3}}`."""
    eval_points: int = Field(default=8, ge=2)
    """Eval-loss points per curve when train.eval_every is not set (train.eval_every = steps / eval_points)."""
    eval_generations: int = Field(default=32, ge=0)
    """Causal LMs with reference replies in the eval data: exact match on this many examples when
    train.eval_generations is not set (0: no exact match)."""
    latency_tokens: int = Field(default=16, ge=1)
    """Causal LMs: new tokens generated (greedy, KV cache) per latency measurement."""
    latency_repeats: int = Field(default=3, ge=1)
    """Timed repetitions of each latency measurement (the median is reported), after one warm-up."""

    @field_validator("methods", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("overrides")
    @classmethod
    def _sections(cls, value: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
        for name, sections in value.items():
            for section in sections:
                if section not in OVERRIDE_SECTIONS:
                    why = ("every method trains on the same data" if section == "data" else
                           "compare writes each method to <output.dir>/<method>" if section == "output" else
                           "not a run config section")
                    raise ValueError(f"{name}.{section}: not allowed here ({why}); a per-method override may set "
                                     f"{', '.join(OVERRIDE_SECTIONS)}")
        return value


def all_methods(registered: list[str], quant_available: bool) -> list[str]:
    """Return what ``--methods all`` selects from the ``registered`` method names: every one but compose,
    plus ``dora``, and ``qlora`` only when ``quant_available``; in ALL_ORDER, unknown new methods last."""
    names = [n for n in ALL_ORDER if n in registered or n in ALIASES]
    names += [n for n in registered if n not in names and n != "compose"]
    return [n for n in names if n != "qlora" or quant_available]


def parse_settings(raw: Any, source: str) -> CompareSettings:
    """Validate the raw ``compare:`` value; return the settings or raise ConfigError naming each bad key."""
    if raw is None:
        return CompareSettings()
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: compare: expected a mapping (methods, max_seconds, overrides, ...), "
                          f"got {raw!r}")
    try:
        return CompareSettings.model_validate(raw)
    except ValidationError as err:
        known = ", ".join(CompareSettings.model_fields)
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                lines.append(f"{source}: compare.{key}: unknown key (the compare section takes {known})")
            else:
                msg = e["msg"].removeprefix("Value error, ")
                got = "" if isinstance(e["input"], dict) else f" (got {e['input']!r})"
                lines.append(f"{source}: compare.{key}: {msg}{got}")
        raise ConfigError("\n".join(lines)) from None
