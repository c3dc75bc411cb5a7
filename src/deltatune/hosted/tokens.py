"""Token counts, the epochs a provider picks by default, billed tokens and (when asked) the price.

    counter = token_counter("gpt-4o-mini-2024-07-18")   # tiktoken o200k_base, or an approximation
    est = estimate(examples, "openai", "gpt-4o-mini-2024-07-18", price_per_million=3.0)

Counting: tiktoken when the model's encoding is known *and* its BPE file can be loaded (tiktoken
downloads it on first use and caches it under ``TIKTOKEN_CACHE_DIR``). Offline, or for models tiktoken
does not know (Gemini), the count is an approximation, ``ceil(characters / 4)`` per text plus the
per-message overhead, and the estimate says so (``exact=False``, printed as "approximate").

Per message the chat format adds 3 tokens plus the role, and 3 more prime the reply (OpenAI's
published counting recipe). OpenAI's default epochs (its cookbook heuristic for ``n_epochs="auto"``):
3, raised so that examples x epochs reaches 100 (at most 25 epochs), lowered so it stays under 25,000
(at least 1). Billed tokens = epochs x the sum of per-example tokens, each capped at the model's
training context. No price list is built in: the price appears only when the caller gives one per 1M
training tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from deltatune.data import Example
from deltatune.hosted.convert import chat_messages

TOKENS_PER_MESSAGE = 3
TOKENS_REPLY_PRIMING = 3
CHARS_PER_TOKEN = 4  # the approximation's ratio: English text averages about 4 characters per token

# OpenAI's heuristic for n_epochs="auto"
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MIN_DEFAULT_EPOCHS = 1
MAX_DEFAULT_EPOCHS = 25

# training context per example (tokens) by model prefix; longer examples are truncated (and billed capped)
OPENAI_MAX_TOKENS = (("gpt-3.5", 16_385), ("gpt-4o", 65_536), ("gpt-4.1", 65_536), ("gpt-4", 65_536))
DEFAULT_OPENAI_MAX_TOKENS = 65_536
VERTEX_MAX_TOKENS = 131_072

_ENCODINGS: dict[str, Callable[[str], int] | None] = {}


def _load_tiktoken(model: str) -> Callable[[str], int]:
    """Load tiktoken's encoding for ``model``; raises when the model is unknown or the file cannot load."""
    import tiktoken

    encoding = tiktoken.encoding_for_model(model)
    return lambda text: len(encoding.encode(text, disallowed_special=()))


def _approximate(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


@dataclass
class TokenCounter:
    """Counts tokens of a text; ``exact`` is False when the count is the characters/4 approximation."""

    count: Callable[[str], int]
    exact: bool
    encoding: str

    def __call__(self, text: str) -> int:
        """Return the number of tokens in ``text``."""
        return self.count(text)


def token_counter(model: str, provider: str = "openai") -> TokenCounter:
    """Return a counter for ``model``: tiktoken where it loads, else the labelled approximation."""
    name = model.split(":")[1] if model.startswith("ft:") else model  # ft:BASE:org:suffix:id
    if provider == "openai":
        if name not in _ENCODINGS:
            try:
                _ENCODINGS[name] = _load_tiktoken(name)
            except Exception:  # unknown model, tiktoken missing, or its BPE file cannot be downloaded
                _ENCODINGS[name] = None
        loaded = _ENCODINGS[name]
        if loaded is not None:
            return TokenCounter(loaded, True, f"tiktoken ({name})")
    return TokenCounter(_approximate, False, f"approximate: characters/{CHARS_PER_TOKEN}")


def example_tokens(example: Example, counter: TokenCounter) -> int:
    """Return the tokens of one example in chat format (content, roles and per-message overhead; tool calls and the
    function schemas counted as their JSON text)."""
    import json

    total = TOKENS_REPLY_PRIMING
    for m in chat_messages(example):
        total += TOKENS_PER_MESSAGE + counter(m.role) + counter(m.content)
        total += sum(counter(call.as_json()) for call in m.tool_calls or [])
    if example.tools:
        total += counter(json.dumps(example.tools))
    return total


def default_epochs(n_examples: int) -> int:
    """Return the epochs OpenAI picks for ``n_epochs="auto"`` with ``n_examples`` training examples."""
    if n_examples <= 0:
        return TARGET_EPOCHS
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_DEFAULT_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / n_examples))
    if n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return TARGET_EPOCHS


def max_tokens(provider: str, model: str) -> int:
    """Return the training context (tokens per example) assumed for ``model``."""
    if provider == "vertex":
        return VERTEX_MAX_TOKENS
    name = model.split(":")[1] if model.startswith("ft:") else model
    return next((n for prefix, n in OPENAI_MAX_TOKENS if name.startswith(prefix)), DEFAULT_OPENAI_MAX_TOKENS)


@dataclass
class Estimate:
    """What a hosted job on these examples would process; ``price`` only when a price was given."""

    provider: str
    model: str
    examples: int
    tokens: int
    exact: bool
    encoding: str
    epochs: int | None
    epochs_source: str
    billed_tokens: int | None
    max_tokens: int
    too_long: int
    per_example: list[int] = field(repr=False, default_factory=list)
    price_per_million: float | None = None
    price: float | None = None

    def lines(self) -> list[str]:
        """Return the estimate as lines of text for the CLI."""
        label = "" if self.exact else " (approximate)"
        out = [f"examples:       {self.examples}",
               f"tokens/epoch:   {self.tokens:,}{label}   [{self.encoding}]",
               f"  per example:  min {min(self.per_example, default=0):,}, "
               f"max {max(self.per_example, default=0):,}, over {self.max_tokens:,}: {self.too_long}"]
        if self.epochs is None:
            out.append(f"epochs:         {self.epochs_source}")
        else:
            out.append(f"epochs:         {self.epochs} ({self.epochs_source})")
            out.append(f"billed tokens:  {self.billed_tokens:,}{label}")
        if self.price is not None:
            out.append(f"price:          {self.price:,.2f} at {self.price_per_million:g} per 1M training tokens"
                       f"{label}")
        elif self.billed_tokens is not None:
            out.append("price:          pass --price-per-1m (the provider's current price per 1M training "
                       "tokens) to see it; no price list is built in")
        return out


def estimate(examples: list[Example], provider: str, model: str, *, epochs: int | None = None,
             price_per_million: float | None = None) -> Estimate:
    """Return token counts, epochs, billed tokens and the price (when ``price_per_million`` is given)."""
    counter = token_counter(model, provider)
    per_example = [example_tokens(e, counter) for e in examples]
    limit = max_tokens(provider, model)
    tokens = sum(per_example)
    if epochs is not None:
        source = "given"
    elif provider == "openai":
        epochs, source = default_epochs(len(examples)), "OpenAI's default for this many examples"
    else:
        source = "Vertex AI's default depends on the model; pass --epochs to see billed tokens"
    billed = None if epochs is None else epochs * sum(min(n, limit) for n in per_example)
    price = None if billed is None or price_per_million is None else billed / 1e6 * price_per_million
    return Estimate(provider, model, len(examples), tokens, counter.exact, counter.encoding, epochs, source,
                    billed, limit, sum(n > limit for n in per_example), per_example, price_per_million, price)
