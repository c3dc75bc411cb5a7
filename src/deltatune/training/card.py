"""Human-readable summaries of a run: the parameter summary printed at setup and the model card."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from deltatune.config import RunConfig
    from deltatune.methods import Method
    from deltatune.training.result import TrainResult
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


PEFT_TYPES = ("LORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")  # what peft itself loads


def model_card(cfg: RunConfig, data: RunData, base: str, result: TrainResult, method: Method,
               peft_type: str | None = None) -> str:
    """Return the README.md written beside the delta: base model, method, data, steps, final figures. Only a
    delta whose ``peft_type`` (its adapter_config.json's) is one peft loads says ``library_name: peft`` and shows
    ``PeftModel``; the others name deltatune as the way to load them."""
    from deltatune.config import dump_config

    def figures(d: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v:.4f}" for k, v in d.items() if isinstance(v, float)) or "n/a"

    em = ""
    if result.generation_start or result.generation_end:
        em = (f"| exact match (held-out) | {result.generation_start.get('exact_match', float('nan')):.1%} | "
              f"{result.generation_end.get('exact_match', float('nan')):.1%} |\n")
    train_loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "n/a"
    objective = cfg.train.objective
    trained = "supervised fine-tuning" if objective == "sft" else f"preference tuning, `{objective}`"
    unit = "pairs" if data.pairs else "examples"
    peft = peft_type in PEFT_TYPES
    out = cfg.output.dir
    if peft:
        use = (f'Use it with deltatune (`deltatune generate {out} "..."`) or with peft\n'
               f'(`PeftModel.from_pretrained(base, "{out}")`, base loaded from the path above).')
    else:
        use = (f'Use it with deltatune (`deltatune generate {out} "..."`, or `deltatune.load_delta("{out}")` in '
               f"Python).\npeft does not load {method.name} deltas."
               + (" `deltatune merge` writes a plain model that transformers loads." if method.mergeable else ""))
    return f"""---
library_name: {"peft" if peft else "deltatune"}
base_model: {base}
tags: [deltatune, {method.name}{", " + objective if objective != "sft" else ""}]
---
# {method.name} delta trained with deltatune

- base model: `{cfg.model.name}` (loaded from `{base}`)
- method: `{method.name}`; objective: {trained}
- data: `{data.train_path}` ({len(data.train)} training {unit}, {len(data.eval)} eval {unit})
- steps: {result.steps}; final training loss {train_loss}

| figure | start | end |
| --- | --- | --- |
| eval | {figures(result.eval_start)} | {figures(result.eval_end)} |
{em}
{use}

## Run config

```yaml
{dump_config(cfg)}```
"""
