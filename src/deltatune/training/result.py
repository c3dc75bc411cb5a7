"""What a training run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainResult:
    """What a finished run produced and measured."""

    output_dir: Path
    steps: int
    train_loss: float | None
    eval_start: dict[str, float] = field(default_factory=dict)
    eval_end: dict[str, float] = field(default_factory=dict)
    generation_start: dict[str, Any] = field(default_factory=dict)
    generation_end: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    train_seconds: float = 0.0  # the step loop alone (no loading, no eval)
    trainable_params: int = 0
    total_params: int = 0
    train_tokens: int = 0  # non-padding tokens the step loop of this call processed (since a resume)
