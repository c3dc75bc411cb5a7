"""Setting up a run: the output folder, the data (or the demo task), the model with its method."""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.config import RunConfig
from deltatune.data import (
    Example,
    TokenizedExample,
    TokenizeReport,
    build_label_map,
    load_examples,
    tokenize_examples,
)
from deltatune.demo import write_demo_data
from deltatune.errors import ConfigError, DataError
from deltatune.training.checkpoint import checkpoint_dirs

RUN_FILE = "run.yaml"


def prepare_output_dir(cfg: RunConfig, resume: bool) -> Path:
    """Check and create ``output.dir``; refuse to mix a new run into an old one. Returns the folder."""
    out = Path(cfg.output.dir)
    if resume:
        if not checkpoint_dirs(out):
            raise ConfigError(f"output.dir: {out} holds no checkpoint to resume; run without --resume")
        return out
    if out.exists() and any(out.iterdir()):
        if not cfg.output.overwrite:
            raise ConfigError(
                f"output.dir: {out} already holds files; pass --resume to continue that run, "
                "output.overwrite=true to replace it, or choose another output.dir"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class RunData:
    """The examples of a run, before and after tokenization."""

    train: list[Example]
    eval: list[Example]
    task: str
    label2id: dict[str, int] | None
    train_path: str
    is_demo: bool


def load_run_data(cfg: RunConfig, out_dir: Path, demo_dir: Path | None = None) -> RunData:
    """Read (or, for the demo, generate) the training and eval examples; hold out an eval split.

    Every malformed example stops here with ``file:line``, before any model is loaded. The demo data is
    written to ``demo_dir`` (default ``out_dir/data``; other ranks than 0 pass a private folder).
    """
    d = cfg.data
    is_demo = d.train is None
    train_path = d.train
    eval_spec = d.eval
    if is_demo:
        train_file, eval_file = write_demo_data(demo_dir or out_dir / "data", seed=cfg.train.seed)
        train_path, eval_spec = str(train_file), str(eval_file)
    assert train_path is not None
    examples = load_examples(train_path, d.format, split=d.split, max_examples=d.max_examples,
                             system_prompt=d.system_prompt)
    if not examples:
        raise DataError(f"{train_path}: no examples")
    if isinstance(eval_spec, float):
        order = list(range(len(examples)))
        random.Random(cfg.train.seed).shuffle(order)
        n_eval = max(1, round(eval_spec * len(examples)))
        if n_eval >= len(examples):
            raise ConfigError(f"data.eval: {eval_spec} leaves no training example out of {len(examples)}")
        held = set(order[:n_eval])
        eval_examples = [examples[i] for i in sorted(held)]
        examples = [ex for i, ex in enumerate(examples) if i not in held]
    elif isinstance(eval_spec, str):
        eval_examples = load_examples(eval_spec, d.format, split="validation" if eval_spec.startswith("hub:")
                                      else d.split, system_prompt=d.system_prompt)
    else:
        eval_examples = []
    is_classification = examples[0].label is not None
    if d.format == "classification" or cfg.model.task == "classification":
        is_classification = True
    task = "classification" if is_classification else "causal_lm"
    label2id = build_label_map(examples + eval_examples) if task == "classification" else None
    return RunData(examples, eval_examples, task, label2id, train_path, is_demo)


def tokenize_run_data(cfg: RunConfig, data: RunData, tokenizer: Any
                      ) -> tuple[list[TokenizedExample], list[TokenizedExample], TokenizeReport]:
    """Tokenize both splits with the run's settings; return (train, eval, train report)."""
    kwargs = {"task": data.task, "max_length": cfg.data.max_length, "truncation": cfg.data.truncation,
              "train_on_prompt": cfg.data.train_on_prompt, "label2id": data.label2id}
    train, report = tokenize_examples(data.train, tokenizer, **kwargs)
    evals, _ = tokenize_examples(data.eval, tokenizer, **kwargs) if data.eval else ([], None)
    if not train:
        raise DataError(f"{data.train_path}: no example left after tokenization ({report.summary()}); "
                        "raise data.max_length or set data.truncation=truncate")
    return train, evals, report


def demo_overrides() -> list[str]:
    """Return the settings `deltatune train` uses when run with no config and no data (the demo)."""
    return ["method.r=8", "method.alpha=16", "train.lr=1e-3", "train.epochs=1", "train.batch_size=8",
            "train.warmup=0.1", "train.eval_generations=64", "output.overwrite=true"]
