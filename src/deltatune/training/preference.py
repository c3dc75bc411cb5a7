"""Preference tuning in a run: the objective from the config, and the reference model's log-probabilities.

The reference of dpo and ipo is the base model, and it costs no second copy:

- on the fly (the default for every method with a disable switch): each step runs the same packed rows once more
  under ``method.disabled(model)``, without gradients and in eval mode (no dropout), as TRL does for a peft model;
- precomputed (``train.precompute_ref: true``, and always for ``full``, which keeps no copy of the base): before
  the first step every pair of both splits is scored once under the same switch (for ``full`` the model before
  any step is the base) and the table is written to ``reference_logps.safetensors`` in the run's folder, keyed by
  a digest of the pairs' tokens, so ``--resume`` reads it instead of recomputing.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deltatune.compute.preference import PreferenceObjective, pair_batches, reply_logps
from deltatune.config import RunConfig, TrainConfig
from deltatune.data import Example
from deltatune.data.pairs import TokenizedPair, tokenize_pairs
from deltatune.errors import DeltatuneError
from deltatune.evaluate import eval_pairs
from deltatune.files import write_atomic
from deltatune.methods import Method

REFERENCE_FILE = "reference_logps.safetensors"
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1}


def objective_of(t: TrainConfig) -> PreferenceObjective | None:
    """The preference objective a run's ``train`` section asks for; None for supervised fine-tuning."""
    if t.objective == "sft":
        return None
    beta = t.beta if t.beta is not None else DEFAULT_BETA[t.objective]
    return PreferenceObjective(t.objective, beta, t.label_smoothing, t.simpo_gamma, t.orpo_lambda)


def can_disable(method: Method, model: nn.Module) -> bool:
    """True when the method has a working disable switch on ``model`` (full fine-tuning has none)."""
    try:
        with method.disabled(model):
            return True
    except DeltatuneError:
        return False


@contextlib.contextmanager
def as_reference(method: Method, model: nn.Module, switch: bool = True) -> Iterator[None]:
    """Within the block ``model`` computes as the reference: eval mode, no gradients and, with ``switch``, the
    delta switched off; the mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (method.disabled(model) if switch else contextlib.nullcontext()):
            yield
    finally:
        model.train(was_training)


def pairs_digest(pairs: Sequence[TokenizedPair]) -> str:
    """A digest of the pairs' tokens and loss positions: the key of a stored reference table."""
    h = hashlib.sha256()
    for p in pairs:
        for part in (p.prompt_ids, p.chosen_ids, p.chosen_labels, p.rejected_ids, p.rejected_labels):
            h.update(repr(part).encode())
    return h.hexdigest()


def score_pairs(model: nn.Module, pairs: Sequence[TokenizedPair], *, batch_size: int, pass_tokens: int | None,
                block_mask: bool, chunked: bool, device: torch.device) -> torch.Tensor:
    """Return the summed reply log-probabilities of every pair as an (N, 2) float32 tensor (chosen, rejected),
    running the model as it is (the caller sets the reference context)."""
    out = torch.zeros(len(pairs), 2)
    for run, batch in pair_batches(pairs, batch_size=batch_size, pass_tokens=pass_tokens, block_mask=block_mask,
                                   device=device):
        out[run] = reply_logps(model, batch, chunked=chunked)[0].view(-1, 2).float().cpu()
    return out


class Reference:
    """The reference log-probabilities of a run's pairs: from a stored table, or computed per batch."""

    def __init__(self, method: Method, model: nn.Module, tables: dict[str, torch.Tensor] | None,
                 chunked: bool) -> None:
        self.method, self.model, self.tables, self.chunked = method, model, tables, chunked

    def logps(self, split: str, batch: dict[str, torch.Tensor], indices: Sequence[int]) -> torch.Tensor:
        """The reference's (2n,) reply log-probabilities of the pairs ``indices`` of ``split`` in ``batch``."""
        if self.tables is not None:
            return self.tables[split][list(indices)].reshape(-1).to(batch["input_ids"].device)
        with as_reference(self.method, self.model):
            logps, _ = reply_logps(self.model, batch, chunked=self.chunked)
        return logps


def prepare_reference(method: Method, model: nn.Module, splits: dict[str, list[TokenizedPair]], *, out: Path | None,
                      precompute: bool, t: TrainConfig, block_mask: bool, device: torch.device,
                      say: Callable[[str], None]) -> Reference:
    """Build the run's Reference: on the fly under the method's disable switch, or (``precompute``, or a method
    without a switch) a table computed once, or read from ``out`` when a run with the same pairs stored it."""
    switch = can_disable(method, model)
    if not precompute and switch:
        say("reference: the base model (the delta switched off), computed with each step")
        return Reference(method, model, None, t.chunked_loss)
    why = "train.precompute_ref" if precompute else f"method {method.config.name!r} has no disable switch"
    digest = pairs_digest([p for name in sorted(splits) for p in splits[name]])
    path = out / REFERENCE_FILE if out is not None else None
    if path is not None and path.is_file():
        with contextlib.suppress(Exception):  # a damaged or foreign table is computed again
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                stored = (f.metadata() or {}).get("pairs")
            if stored == digest:
                say(f"reference: log-probabilities read from {path}")
                return Reference(method, model, load_file(str(path)), t.chunked_loss)
    tables = {}
    with as_reference(method, model, switch=switch):
        for name, pairs in splits.items():
            tables[name] = score_pairs(model, pairs, batch_size=t.batch_size, pass_tokens=t.pass_tokens,
                                       block_mask=block_mask, chunked=t.chunked_loss, device=device)
    if path is not None:
        write_atomic(path, lambda tmp: save_file(tables, str(tmp), metadata={"pairs": digest}))
    say(f"reference: log-probabilities of {sum(len(p) for p in splits.values())} pairs computed once before "
        f"training ({why})" + (f", kept in {path}" if path is not None else ""))
    return Reference(method, model, tables, t.chunked_loss)


def evaluate_delta_on_pairs(model: nn.Module, method: Method, tokenizer: object, examples: list[Example],
                            cfg: RunConfig, *, batch_size: int, device: torch.device,
                            base_loader: Callable[[], nn.Module]) -> dict[str, float]:
    """Figures of a trained delta on held-out preference pairs (``deltatune eval``): the run's objective (dpo when
    the run was supervised) with its settings; the reference is the base under the method's disable switch, or a
    separately loaded base (``base_loader``) for a method without one. Returns eval_pairs' figures and ``pairs``."""
    t = cfg.train if cfg.train.objective != "sft" else cfg.train.model_copy(update={"objective": "dpo"})
    objective = objective_of(t)
    assert objective is not None
    pairs, report = tokenize_pairs(examples, tokenizer, max_length=cfg.data.max_length,
                                   truncation=cfg.data.truncation)
    reference = None
    if objective.needs_reference:
        base = model if can_disable(method, model) else base_loader()

        def reference(batch: dict[str, torch.Tensor], _indices: Sequence[int]) -> torch.Tensor:
            with as_reference(method, base, switch=base is model):
                return reply_logps(base, batch, chunked=t.chunked_loss)[0]

    figures = eval_pairs(model, pairs, objective, reference=reference, batch_size=batch_size,
                         pass_tokens=t.pass_tokens, device=device, chunked=t.chunked_loss)
    return {"objective": objective.name, **figures, "pairs": report.n_kept}  # type: ignore[dict-item]
