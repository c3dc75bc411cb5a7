"""Check a data set the way the hosted services do, before anything is uploaded.

    report = check("train.jsonl", "openai", model="gpt-4o-mini-2024-07-18")
    if not report.ok:
        print(*report.errors, sep="\n")        # "train.jsonl:7: messages[1]: field 'content' is empty; ..."

Unlike training, which stops at the first bad record, this reads every record and reports each problem
with its ``file:line``: a missing or unknown role, empty content, no assistant turn, a bad weight (preference
pairs: a prompt that does not end with a user turn, a reply that is not one assistant turn), an
example longer than the model's training context, and for Vertex AI a conversation that does not start
with a user turn or end with a model turn. Warnings: examples with no system message, weight-0 turns on
Vertex AI (trained on there), a set smaller than the provider recommends. Fewer examples than the
provider's documented minimum is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deltatune.data import Example, detect_format, read_records, to_example
from deltatune.errors import DataError
from deltatune.hosted.convert import PROVIDERS, chat_messages, convert, weight0_turns
from deltatune.hosted.tokens import TokenCounter, example_tokens, max_tokens, token_counter

# documented by the providers: OpenAI requires at least 10 examples and sees clear gains from 50-100;
# Vertex AI's Gemini tuning docs give a minimum of 16 and recommend starting with 100
MIN_EXAMPLES = {"openai": 10, "vertex": 16}
RECOMMENDED_EXAMPLES = {"openai": 50, "vertex": 100}
MAX_LISTED = 5  # origins quoted in one warning


@dataclass
class Report:
    """The outcome of checking a data set: converted rows, per-example errors and warnings."""

    provider: str
    examples: list[Example] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Return True when there are no errors (warnings are allowed)."""
        return not self.errors

    def raise_for_errors(self, path: str, limit: int = 20) -> None:
        """Raise DataError listing the first ``limit`` errors when there are any; return None otherwise."""
        if self.errors:
            shown = self.errors[:limit]
            more = f"\n  ... and {len(self.errors) - limit} more" if len(self.errors) > limit else ""
            raise DataError(f"{path}: {len(self.errors)} problem(s) for {self.provider}; fix them and run "
                            "`deltatune hosted prepare` again:\n  " + "\n  ".join(shown) + more)


def read_examples(path: str, fmt: str = "auto", *, system_prompt: str | None = None
                  ) -> tuple[list[Example], list[str]]:
    """Read every record of a data file and convert each one; return the examples and per-record errors.

    A file that cannot be read at all (missing, malformed JSON line) still raises DataError at once.
    """
    records = read_records(path)
    if fmt == "auto":
        fmt = detect_format(records[0][1], records[0][0])
    examples: list[Example] = []
    errors: list[str] = []
    for origin, record in records:
        try:
            example = to_example(record, origin, fmt, system_prompt=system_prompt)
            chat_messages(example)  # plain text has no turns: an error here, not at upload
            examples.append(example)
        except DataError as err:
            errors.append(str(err))
    return examples, errors


def _pair_turns(example: Example, provider: str) -> list[str]:
    """A preference pair as both providers check it: a prompt that ends with a user turn (Vertex AI: that also
    starts with one, after any system message); the replies are one assistant turn each by construction."""
    turns = [m for m in example.messages or [] if m.role != "system"]
    problems = []
    if not turns or turns[-1].role != "user":
        problems.append(f"{example.origin}: the prompt of a preference pair must end with a user turn for {provider}")
    if provider == "vertex" and turns and turns[0].role != "user":
        problems.append(f"{example.origin}: the first turn after the system message must be a user turn for Vertex "
                        f"AI (got {turns[0].role})")
    if any(m.weight is not None for m in example.messages or []):
        problems.append(f"{example.origin}: per-turn weights are not allowed in preference data; remove them")
    return problems


def _vertex_turns(example: Example) -> list[str]:
    turns = [m for m in chat_messages(example) if m.role != "system"]
    turns = [m if m.role != "tool" else type(m)("user", m.content) for m in turns]  # results are user turns there
    problems = []
    if not turns or turns[0].role != "user":
        problems.append(f"{example.origin}: the first turn after the system message must be a user turn "
                        "for Vertex AI (got " + (turns[0].role if turns else "none") + ")")
    if turns and turns[-1].role != "assistant":
        problems.append(f"{example.origin}: the last turn must be an assistant (model) turn for Vertex AI; "
                        "remove the trailing user turn")
    return problems


def _listed(origins: list[str]) -> str:
    more = f" and {len(origins) - MAX_LISTED} more" if len(origins) > MAX_LISTED else ""
    return ", ".join(origins[:MAX_LISTED]) + more


def check_examples(examples: list[Example], provider: str, *, model: str | None = None,
                   counter: TokenCounter | None = None, role: str = "training",
                   n_records: int | None = None) -> Report:
    """Check converted examples for ``provider``; return a Report with the provider's rows.

    ``n_records`` is the number of records read (examples plus those that failed to convert), for the
    minimum-count check; it defaults to ``len(examples)``.
    """
    if provider not in PROVIDERS:
        raise DataError(f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}")
    report = Report(provider)
    limit = max_tokens(provider, model or "")
    counter = counter or token_counter(model or "", provider)
    no_system: list[str] = []
    weight0: list[str] = []
    for example in examples:
        try:
            row = convert(example, provider)
        except DataError as err:
            report.errors.append(str(err))
            continue
        if example.is_pair:
            problems = _pair_turns(example, provider)
        else:
            problems = _vertex_turns(example) if provider == "vertex" else []
        tokens = example_tokens(example, counter)
        if tokens > limit:
            approx = "" if counter.exact else " (approximate)"
            problems.append(f"{example.origin}: {tokens:,} tokens{approx}, over the {limit:,}-token training "
                            "context; shorten or split the example")
        if problems:
            report.errors.extend(problems)
            continue
        if not any(m.role == "system" for m in chat_messages(example)):
            no_system.append(example.origin)
        if provider == "vertex" and weight0_turns(example):
            weight0.append(example.origin)
        report.examples.append(example)
        report.rows.append(row)
    if no_system:
        report.warnings.append(f"{len(no_system)} of {len(examples)} examples have no system message "
                               f"({_listed(no_system)}); fine, but the same system prompt at training and "
                               "inference usually helps")
    if weight0:
        report.warnings.append(f"{len(weight0)} examples have weight-0 assistant turns ({_listed(weight0)}): "
                               "Vertex AI has no per-turn weight, so they are kept as ordinary model turns "
                               "and trained on; drop those turns from the data if that is not wanted")
    if role == "training":
        n = len(examples) if n_records is None else n_records
        if n < MIN_EXAMPLES[provider]:
            report.errors.append(f"{n} training examples; {provider} requires at least {MIN_EXAMPLES[provider]}")
        elif n < RECOMMENDED_EXAMPLES[provider]:
            report.warnings.append(f"only {n} training examples; {provider} recommends at least "
                                   f"{RECOMMENDED_EXAMPLES[provider]} for a clear improvement")
    return report


def check(path: str, provider: str, *, model: str | None = None, fmt: str = "auto",
          system_prompt: str | None = None, role: str = "training") -> Report:
    """Read, convert and check a data file for ``provider``; return the Report (errors are not raised)."""
    examples, errors = read_examples(path, fmt, system_prompt=system_prompt)
    report = check_examples(examples, provider, model=model, role=role,
                            n_records=len(examples) + len(errors))
    report.errors[:0] = errors
    return report
