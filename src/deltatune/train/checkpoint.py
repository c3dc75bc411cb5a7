"""Atomic training checkpoints: trainable tensors, optimizer and schedule state, RNG and data position.

A checkpoint is a folder ``checkpoints/step-NNNNNN`` written under a temporary name and renamed into
place, so the newest complete checkpoint is always intact. Tensors are safetensors; optimizer state is
read back with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.errors import DeltatuneError

CHECKPOINTS = "checkpoints"


@dataclass
class TrainState:
    """Where training stands: optimizer steps done, the epoch, and micro-batches consumed in it."""

    step: int = 0
    epoch: int = 0
    cursor: int = 0
    tokens_seen: int = 0


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Return the complete checkpoints in ``out_dir``, oldest first."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())


def save_checkpoint(
    out_dir: Path,
    state: TrainState,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    keep: int = 2,
) -> Path:
    """Write a checkpoint of the current state and keep only the newest ``keep``; return its folder."""
    root = out_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_file({k: p.detach().cpu().contiguous() for k, p in params.items()}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state)))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoint_dirs(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    folder: Path,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainState:
    """Restore trainable tensors, optimizer, schedule and RNG from ``folder``; return the TrainState."""
    tensors = load_file(str(folder / "trainable.safetensors"))
    if set(tensors) != set(params):
        raise DeltatuneError(
            f"{folder}: this checkpoint was made with another method or model config; "
            "resume with the same config, or start a new output.dir"
        )
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise DeltatuneError(f"{folder}: {name} has another shape; resume with the same config")
            p.copy_(tensors[name])
    extra = torch.load(folder / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"])
    return TrainState(**json.loads((folder / "state.json").read_text()))
