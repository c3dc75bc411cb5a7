"""Atomic training checkpoints: trainable tensors, optimizer and schedule state, RNG and data position.

A checkpoint is a folder ``checkpoints/step-NNNNNN`` written under a temporary name and renamed into
place, so the newest complete checkpoint is always intact. Its ``manifest.json``, written last, holds each
file's size and SHA-256: ``--resume`` checks them and passes over a checkpoint damaged since (a truncated
or replaced file) to the newest intact one. Tensors are safetensors; optimizer state is read back with
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.

Under torchrun rank 0 writes the checkpoint: whole tensors, the full optimizer state (keyed by parameter
name), every rank's RNG state, and the world size, which a resume must match.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.files import write_folder_atomic

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"


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
        files = sorted(p for p in tmp.iterdir() if p.name != MANIFEST)
        manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))

    write_folder_atomic(final, write)
    for old in checkpoint_dirs(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_damage(folder: Path) -> str | None:
    """Return what is wrong with a checkpoint (a file missing, truncated or changed since it was written, by
    its manifest), or None when it is intact. A checkpoint of an earlier version (no manifest) counts as
    intact; reading it still fails cleanly if it is not."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        for name, entry in manifest.items():
            file = folder / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != entry["bytes"]:
                return f"{name} is {file.stat().st_size} bytes, {entry['bytes']} were written"
            if _sha256(file) != entry["sha256"]:
                return f"{name} changed since it was written (checksum differs)"
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return f"{MANIFEST} is unreadable"
    return None


def newest_intact_checkpoint(out_dir: Path, say: Callable[[str], None]) -> Path | None:
    """Return the newest checkpoint in ``out_dir`` that its manifest says is intact, telling ``say`` about
    each newer one passed over; None when there is none."""
    for folder in reversed(checkpoint_dirs(out_dir)):
        damage = checkpoint_damage(folder)
        if damage is None:
            return folder
        say(f"skipping checkpoint {folder}: {damage}")
    return None


def remove_partial_checkpoints(out_dir: Path) -> list[str]:
    """Remove the temporary folders of checkpoint writes a kill interrupted (``checkpoints/.step-*``); call
    it only while holding the output folder's lock. Returns the names removed."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    partial = [p for p in root.glob(".step-*") if p.is_dir()]
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in partial]


def read_state(folder: Path, world_size: int) -> TrainState:
    """Return the checkpoint's TrainState; raise DeltatuneError if it is unreadable or was written by another
    world size."""
    try:
        state = TrainState(**json.loads((folder / "state.json").read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise DeltatuneError(f"{folder / 'state.json'}: unreadable ({type(err).__name__}); resume from "
                             "another checkpoint (remove this one) or start a new output.dir") from None
    if state.world_size != world_size:
        raise DeltatuneError(
            f"{folder}: this checkpoint was written by {state.world_size} process(es), this run has {world_size}; "
            f"resume with {state.world_size} (torchrun --nproc-per-node / --nnodes), or start a new output.dir"
        )
    return state


def load_trainable(folder: Path, params: dict[str, nn.Parameter]) -> None:
    """Copy the checkpoint's trainable tensors into ``params`` (whole, unwrapped parameters)."""
    try:
        tensors = load_file(str(folder / "trainable.safetensors"))
    except (SafetensorError, OSError) as err:
        raise DeltatuneError(f"{folder / 'trainable.safetensors'}: unreadable ({err}); resume from another "
                             "checkpoint (remove this one) or start a new output.dir") from None
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
    """Return the optimizer, schedule and RNG states (``torch.load(weights_only=True)``: no arbitrary objects).
    Raises DeltatuneError, without torch's advice to load unsafely, when the file is damaged or holds
    anything but tensors and plain containers."""
    path = folder / "optimizer.pt"
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a file it will refuse anyway
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise DeltatuneError(f"{path}: holds objects other than tensors, which deltatune never loads (it did "
                             "not write this file); resume from another checkpoint or start a new "
                             "output.dir") from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise DeltatuneError(f"{path}: unreadable ({type(err).__name__}); resume from another checkpoint "
                             "(remove this one) or start a new output.dir") from None
