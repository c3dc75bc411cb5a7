"""Offline preference objectives: DPO, IPO, SimPO and ORPO on packed pairs (data/pairs.py).

    logps, counts = reply_logps(model, batch)            # (2n,): pair k's chosen at 2k, its rejected at 2k + 1
    terms = objective.terms(logps, counts, ref_logps)    # per-pair losses and rewards

``logps`` are summed log-probabilities of each reply's supervised tokens given the prompt (float32); ``counts`` the
number of those tokens. The objectives, with beta, the reference log-probs ref and avg = logps / counts:

- ``dpo`` (Rafailov et al. 2023): d = (logp_c - ref_c) - (logp_r - ref_r); loss = -log sigmoid(beta d). With
  ``label_smoothing`` e > 0 the conservative form -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d) (the
  "cDPO" form TRL's ``sigmoid`` loss used until 0.x; TRL 1.x keeps only the robust variant).
- ``ipo`` (Azar et al. 2023, eq. 17): loss = (d' - 1 / (2 beta))^2 with d' the difference of the *per-token* log
  ratios (d normalised by each reply's token count): TRL's choice, confirmed by the IPO authors.
- ``simpo`` (Meng et al. 2024): loss = -log sigmoid(beta (avg_c - avg_r) - gamma); no reference. TRL's CPOTrainer
  with ``loss_type="simpo"``, ``cpo_alpha=0``.
- ``orpo`` (Hong et al. 2024): log odds = (avg_c - avg_r) - (log(1 - e^avg_c) - log(1 - e^avg_r)); loss =
  NLL(chosen) - lambda log sigmoid(log odds), the NLL a token mean over the step's chosen tokens, as TRL's
  ORPOTrainer (whose ``beta`` is this lambda); no reference.

Rewards, as TRL logs them: dpo and ipo beta (logp - ref); simpo beta avg; orpo lambda avg. Reward accuracy is the
share of pairs whose chosen reward exceeds the rejected one; the margin is their mean difference.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.compute.attention import PAIRS, packed_attention_enabled
from deltatune.compute.chunked_ce import hidden_states_at, linear_token_logps, plain_output_layer
from deltatune.compute.loss import accepts_logits_to_keep
from deltatune.data import split_by_tokens
from deltatune.data.pairs import TokenizedPair, collate_pairs

OBJECTIVES = ("sft", "dpo", "ipo", "simpo", "orpo")
NEEDS_REFERENCE = frozenset({"dpo", "ipo"})
STAT_KEYS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")


def pair_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The forward arguments of a packed pair row: ids, positions and the mask, or the pair layout for a model
    running deltatune's per-example attention."""
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"]
    elif packed_attention_enabled(model):
        inputs[PAIRS] = batch["layout"].tolist()
    else:
        raise ValueError("a pair row without a mask needs a model running deltatune's per-example attention")
    return inputs


def pair_batches(pairs: Sequence[TokenizedPair], *, batch_size: int, pass_tokens: int | None, block_mask: bool,
                 device: torch.device) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Yield ``(indices, batch on device)`` over ``pairs`` in order: ``batch_size`` pairs at a time, each cut into
    rows of at most ``pass_tokens`` tokens (evaluation and the precomputed reference read pairs this way)."""
    lengths = [len(p.input_ids) for p in pairs]
    for start in range(0, len(pairs), batch_size):
        for run in split_by_tokens(range(start, min(start + batch_size, len(pairs))), lengths, pass_tokens):
            batch = collate_pairs([pairs[i] for i in run], block_mask=block_mask)
            yield run, {k: v.to(device) for k, v in batch.items()}


def reply_logps(model: nn.Module, batch: dict[str, torch.Tensor], chunked: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (summed log-probability of each reply's supervised tokens, their count), both (2n,) for the n pairs
    of ``batch`` (chosen at even, rejected at odd indices). With ``chunked`` and a plain output layer the model
    returns hidden states at the needed positions and the log-probabilities are taken chunk by chunk."""
    keep, targets, sequence = batch["keep"], batch["targets"], batch["sequence"]
    n = 2 * int(batch["num_pairs"])
    inputs = pair_inputs(model, batch)
    if accepts_logits_to_keep(model):
        head = plain_output_layer(model) if chunked else None
        if head is not None:
            with hidden_states_at(model):
                hidden = model(**inputs, logits_to_keep=keep).logits[0]  # (N, d)
            token = linear_token_logps(hidden, head.weight, targets)
        else:
            logits = model(**inputs, logits_to_keep=keep).logits[0]  # (N, V)
            token = torch.log_softmax(logits.float(), -1).gather(1, targets[:, None]).squeeze(1)
    else:
        logits = model(**inputs).logits[0, keep]
        token = torch.log_softmax(logits.float(), -1).gather(1, targets[:, None]).squeeze(1)
    sums = torch.zeros(n, dtype=torch.float32, device=token.device).index_add(0, sequence, token)
    counts = torch.bincount(sequence, minlength=n).to(torch.float32)
    return sums, counts


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurately on both sides of -log 2."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass(frozen=True)
class PairTerms:
    """Per-pair figures of one batch: ``loss`` (n,) the pair terms (averaged over the step's pairs),
    ``nll_sum`` the summed chosen-token NLL (ORPO; averaged over the step's chosen tokens), rewards (n,)."""

    loss: torch.Tensor
    nll_sum: torch.Tensor | None
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    def stats(self) -> dict[str, float]:
        """Sums over the batch's pairs of the figures ``metrics.jsonl`` reports as means."""
        c, r = self.chosen_rewards.detach(), self.rejected_rewards.detach()
        return {"rewards_chosen": float(c.sum()), "rewards_rejected": float(r.sum()),
                "reward_margin": float((c - r).sum()), "reward_accuracy": float((c > r).float().sum())}


@dataclass(frozen=True)
class PreferenceObjective:
    """One objective with its settings; :meth:`terms` turns reply log-probabilities into losses and rewards."""

    name: str
    beta: float
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1

    @property
    def needs_reference(self) -> bool:
        """True for dpo and ipo, whose rewards are measured against the reference model."""
        return self.name in NEEDS_REFERENCE

    def terms(self, logps: torch.Tensor, counts: torch.Tensor, ref_logps: torch.Tensor | None = None) -> PairTerms:
        """The per-pair loss terms and rewards for reply log-probabilities ``logps`` (2n,) with token ``counts``
        and, for dpo and ipo, the reference's ``ref_logps`` (2n,)."""
        chosen, rejected = logps[0::2], logps[1::2]
        n_c, n_r = counts[0::2].clamp(min=1), counts[1::2].clamp(min=1)
        beta = self.beta
        if self.needs_reference:
            if ref_logps is None:
                raise ValueError(f"objective {self.name} needs the reference log-probabilities")
            ratio_c, ratio_r = chosen - ref_logps[0::2], rejected - ref_logps[1::2]
            if self.name == "dpo":
                d = beta * (ratio_c - ratio_r)
                loss = -(1 - self.label_smoothing) * F.logsigmoid(d) - self.label_smoothing * F.logsigmoid(-d)
            else:
                loss = (ratio_c / n_c - ratio_r / n_r - 1 / (2 * beta)) ** 2
            return PairTerms(loss, None, beta * ratio_c, beta * ratio_r)
        avg_c, avg_r = chosen / n_c, rejected / n_r
        if self.name == "simpo":
            loss = -F.logsigmoid(beta * (avg_c - avg_r) - self.simpo_gamma)
            return PairTerms(loss, None, beta * avg_c, beta * avg_r)
        if self.name == "orpo":
            log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
            lam = self.orpo_lambda
            return PairTerms(-lam * F.logsigmoid(log_odds), -chosen.sum(), lam * avg_c, lam * avg_r)
        raise ValueError(f"unknown preference objective {self.name!r}; use one of {', '.join(OBJECTIVES[1:])}")
