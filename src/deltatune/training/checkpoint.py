"""Atomic training checkpoints: trainable tensors, optimizer and schedule state, RNG and data position.

A checkpoint is a folder ``checkpoints/step-NNNNNN`` written under a temporary name and renamed into
place, so the newest complete checkpoint is always intact. Tensors are safetensors; optimizer state is
read back with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.

Under torchrun rank 0 writes the checkpoint: whole tensors, the full optimizer state (keyed by parameter
name), every rank's RNG state, and the world size, which a resume must match.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.files import write_folder_atomic

CHECKPOINTS = "checkpoints"


@dataclass
class TrainState:
    """Where training stands: optimizer steps done, the epoch, and micro-batches consumed in it (counted over
    every rank), and how many ranks trained (a checkpoint resumes only on the same world size)."""

    step: int = 0
    epoch: int = 0
    cursor: int = 0
    tokens_seen: int = 0
    world_size: int = 1


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Return the complete checkpoints in ``out_dir``, oldest first."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())


def save_checkpoint(out_dir: Path, state: TrainState, tensors: dict[str, torch.Tensor], extra: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write a checkpoint and keep only the newest ``keep``; return its folder.

    ``tensors`` are the trainable tensors (whole, on the CPU); ``extra`` holds the optimizer and schedule
    states and the RNG state(s), plain tensors and containers only.
    """
    root = out_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"

    def write(tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
        torch.save(extra, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state)))

    write_folder_atomic(final, write)
    for old in checkpoint_dirs(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(folder: Path, world_size: int) -> TrainState:
    """Return the checkpoint's TrainState; raise DeltatuneError if it was written by another world size."""
    state = TrainState(**json.loads((folder / "state.json").read_text()))
    if state.world_size != world_size:
        raise DeltatuneError(
            f"{folder}: this checkpoint was written by {state.world_size} process(es), this run has {world_size}; "
            f"resume with {state.world_size} (torchrun --nproc-per-node / --nnodes), or start a new output.dir"
        )
    return state


def load_trainable(folder: Path, params: dict[str, nn.Parameter]) -> None:
    """Copy the checkpoint's trainable tensors into ``params`` (whole, unwrapped parameters)."""
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


def load_extra(folder: Path) -> dict[str, Any]:
    """Return the optimizer, schedule and RNG states (``torch.load(weights_only=True)``: no arbitrary objects)."""
    return torch.load(folder / "optimizer.pt", weights_only=True)
