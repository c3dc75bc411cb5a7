"""Setting up a run: the output folder, the data (or the demo task), the model with its method."""

from __future__ import annotations

import random
from contextlib import ExitStack
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
from deltatune.data.pairs import TokenizedPair, tokenize_pairs
from deltatune.delta import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE
from deltatune.demo import write_demo_data
from deltatune.errors import ConfigError, DataError
from deltatune.outputs import (
    check_output_path,
    claim,
    clear,
    lock_output,
    read_marker,
    refuse_foreign,
    remove_temporaries,
)
from deltatune.training.checkpoint import CHECKPOINTS, checkpoint_dirs, remove_partial_checkpoints

RUN_FILE = "run.yaml"
METRICS_FILE = "metrics.jsonl"
DEMO_DATA = "data"
# what a training run writes into its folder (compare.json: a compare method's record, see compare/child.py);
# output.overwrite clears exactly these
RUN_ENTRIES = frozenset({RUN_FILE, METRICS_FILE, CHECKPOINTS, DEMO_DATA, CONFIG_FILE, WEIGHTS_FILE, CARD_FILE,
                         "compare.json", "reference_logps.safetensors"})


def prepare_output_dir(cfg: RunConfig, resume: bool, stack: ExitStack) -> Path:
    """Check ``output.dir``, lock it for the run's life (the lock joins ``stack``) and claim it; return it.

    A new or empty folder is claimed. A folder of an earlier run (marked, see :mod:`deltatune.outputs`) is
    resumed with ``resume``; cleared of that run's files with ``output.overwrite``, or without it when the
    run left neither a checkpoint nor a delta (it stopped early: a fresh start). A folder holding anything
    deltatune did not write is refused, as is one another process is writing. What a killed write left
    (temporary files, a half-written checkpoint folder) is removed.
    """
    key = "output.dir"
    out = check_output_path(cfg.output.dir, key)
    marker = read_marker(out) if out.is_dir() else None
    if marker is not None and marker["kind"] != "run":
        raise ConfigError(f"{key}: {out} holds a deltatune {marker['kind']} output, not a training run; choose "
                          "another output.dir")
    if resume and not checkpoint_dirs(out):
        raise ConfigError(f"{key}: {out} holds no checkpoint to resume; run without --resume")
    if marker is None and not resume:  # (a run of an earlier version, without a marker, may resume)
        refuse_foreign(out, key, "run")
    stack.enter_context(lock_output(out, key))
    remove_temporaries(out, RUN_ENTRIES)
    remove_partial_checkpoints(out)
    if not resume and marker is not None:
        if (checkpoint_dirs(out) or (out / WEIGHTS_FILE).exists()) and not cfg.output.overwrite:
            raise ConfigError(f"{key}: {out} already holds a run; pass --resume to continue it, "
                              "output.overwrite=true to replace it, or choose another output.dir")
        clear(out, RUN_ENTRIES, key)
    if marker is None or not resume:
        claim(out, "run", demo=cfg.data.train is None)
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
    pairs: bool = False  # preference pairs (prompt, chosen, rejected)


def load_run_data(cfg: RunConfig, out_dir: Path, demo_dir: Path | None = None) -> RunData:
    """Read (or, for the demo, generate) the training and eval examples; hold out an eval split.

    Every malformed example stops here with ``file:line``, before any model is loaded. The demo data is
    written to ``demo_dir`` (default ``out_dir/data``; other ranks than 0 pass a private folder).
    """
    d = cfg.data
    is_demo = d.train is None
    train_path = d.train
    eval_spec = d.eval
    if is_demo and cfg.train.objective != "sft":
        raise ConfigError(f"train.objective={cfg.train.objective} needs preference pairs: set data.train to a file of "
                          "prompt/chosen/rejected records (the built-in demo is supervised)")
    if is_demo:
        train_file, eval_file = write_demo_data(demo_dir or out_dir / DEMO_DATA, seed=cfg.train.seed)
        train_path, eval_spec = str(train_file), str(eval_file)
    assert train_path is not None
    skipped: list[str] | None = [] if d.on_invalid == "skip" else None
    examples = load_examples(train_path, d.format, split=d.split, max_examples=d.max_examples,
                             system_prompt=d.system_prompt, skipped=skipped)
    if skipped:
        shown = "; ".join(skipped[:3]) + (f"; ... and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        print(f"data: left out {len(skipped)} invalid records (data.on_invalid=skip): {shown}", flush=True)
    if not examples:
        raise DataError(f"{train_path}: no examples")
    pairs = examples[0].is_pair
    _check_objective(cfg, pairs, train_path)
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
                                      else d.split, system_prompt=d.system_prompt,
                                      skipped=[] if d.on_invalid == "skip" else None)
    else:
        eval_examples = []
    is_classification = examples[0].label is not None
    if d.format == "classification" or cfg.model.task == "classification":
        is_classification = True
    task = "classification" if is_classification else "causal_lm"
    label2id = build_label_map(examples + eval_examples) if task == "classification" else None
    return RunData(examples, eval_examples, task, label2id, train_path, is_demo, pairs)


def _check_objective(cfg: RunConfig, pairs: bool, train_path: str) -> None:
    """Preference data and a preference objective go together; raise ConfigError naming the way out."""
    objective = cfg.train.objective
    if pairs and objective == "sft":
        raise ConfigError(f"{train_path} holds preference pairs (chosen/rejected): set train.objective to dpo, ipo, "
                          "simpo or orpo, or train with sft on a supervised format")
    if not pairs and objective != "sft":
        raise ConfigError(f"train.objective={objective} needs preference pairs, but {train_path} holds supervised "
                          "examples: give prompt/chosen/rejected records (see `deltatune config`, data.format)")
    if pairs and (cfg.model.task == "classification" or cfg.data.format == "classification"):
        raise ConfigError("preference tuning trains a causal LM: set model.task to auto or causal_lm")
    if cfg.train.label_smoothing and objective != "dpo":
        raise ConfigError(f"train.label_smoothing applies to dpo only (the objective is {objective}); remove it")


Tokenized = list[TokenizedExample] | list[TokenizedPair]


def tokenize_run_data(cfg: RunConfig, data: RunData, tokenizer: Any) -> tuple[Tokenized, Tokenized, TokenizeReport]:
    """Tokenize both splits with the run's settings, or take them from the cache when the same data, tokenizer and
    settings were tokenized before (``tokenized_cache``); return (train, eval, train report). Preference pairs
    become TokenizedPairs."""
    from deltatune.training.tokenized_cache import cache_key, cached_tokenization

    if data.pairs:  # pairs tokenize in about a millisecond each: not cached
        train_pairs, report = tokenize_pairs(data.train, tokenizer, max_length=cfg.data.max_length,
                                             truncation=cfg.data.truncation)
        eval_pairs = tokenize_pairs(data.eval, tokenizer, max_length=cfg.data.max_length,
                                    truncation=cfg.data.truncation)[0] if data.eval else []
        if not train_pairs:
            raise DataError(f"{data.train_path}: no pair left after tokenization ({report.summary()}); raise "
                            "data.max_length or set data.truncation=truncate")
        return train_pairs, eval_pairs, report
    kwargs = {"task": data.task, "max_length": cfg.data.max_length, "truncation": cfg.data.truncation,
              "train_on_prompt": cfg.data.train_on_prompt, "label2id": data.label2id}

    def compute() -> tuple[list[TokenizedExample], list[TokenizedExample], TokenizeReport]:
        train, report = tokenize_examples(data.train, tokenizer, **kwargs)
        evals, _ = tokenize_examples(data.eval, tokenizer, **kwargs) if data.eval else ([], None)
        return train, evals, report

    key = cache_key({"train": data.train, "eval": data.eval}, tokenizer, kwargs)
    train, evals, report, _ = cached_tokenization(key, compute)
    if not train:
        raise DataError(f"{data.train_path}: no example left after tokenization ({report.summary()}); "
                        "raise data.max_length or set data.truncation=truncate")
    return train, evals, report


def demo_overrides(output_dir: str) -> list[str]:
    """Return the settings `deltatune train` uses when run with no config and no data (the demo). The demo
    replaces its own earlier output, never anything else: ``output.overwrite`` is turned on only when
    ``output_dir`` is absent or holds an earlier demo run."""
    settings = ["method.r=8", "method.alpha=16", "train.lr=1e-3", "train.epochs=1", "train.batch_size=8",
                "train.warmup=0.1", "train.eval_generations=64"]
    path = Path(output_dir)
    marker = read_marker(path) if output_dir.strip() and path.is_dir() else None
    if marker is not None and marker.get("kind") == "run" and marker.get("demo") is True:
        settings.append("output.overwrite=true")
    return settings
