"""Human-readable summaries of a run: the parameter summary printed at setup and the model card."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from deltatune.config import RunConfig
    from deltatune.methods import Method
    from deltatune.training.loop import TrainResult
    from deltatune.training.setup import RunData


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return f"{n:.1f}T"


def summarize_parameters(model: nn.Module, params: dict[str, nn.Parameter], method: Method) -> str:
    """Return one line: trainable parameters, their share of the model, and the delta's size on disk."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in params.values())
    delta_bytes = sum(t.numel() * t.element_size() for t in method.delta_state_dict(model).values())
    return (f"{method.name}: {_human(trainable)} trainable of {_human(total)} parameters "
            f"({100 * trainable / total:.3f}%); delta on disk {delta_bytes / 1e6:.2f} MB")


def model_card(cfg: RunConfig, data: RunData, base: str, result: TrainResult, method: Method) -> str:
    """Return the README.md written beside the delta: base model, method, data, steps, final figures."""
    from deltatune.config import dump_config

    def figures(d: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v:.4f}" for k, v in d.items() if isinstance(v, float)) or "n/a"

    em = ""
    if result.generation_start or result.generation_end:
        em = (f"| exact match (held-out) | {result.generation_start.get('exact_match', float('nan')):.1%} | "
              f"{result.generation_end.get('exact_match', float('nan')):.1%} |\n")
    train_loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "n/a"
    return f"""---
library_name: peft
base_model: {base}
tags: [deltatune, {method.name}]
---
# {method.name} delta trained with deltatune

- base model: `{cfg.model.name}` (loaded from `{base}`)
- method: `{method.name}`
- data: `{data.train_path}` ({len(data.train)} training examples, {len(data.eval)} eval examples)
- steps: {result.steps}; final training loss {train_loss}

| figure | start | end |
| --- | --- | --- |
| eval | {figures(result.eval_start)} | {figures(result.eval_end)} |
{em}
Use it with deltatune (`deltatune generate {cfg.output.dir} "..."`) or with peft
(`PeftModel.from_pretrained(base, "{cfg.output.dir}")`, base loaded from the path above).

## Run config

```yaml
{dump_config(cfg)}```
"""
