"""Inference latency of a trained delta, unmerged and merged, and the peak memory of this process.

    latency = measure_latency(load_delta("runs/cmp/lora"), inputs, new_tokens=16, repeats=3)
    # {"unit": "ms per generated token", "unmerged_ms": 3.1, "merged_ms": 2.4, "can_merge": "yes", ...}

Causal LMs: greedy generation of ``new_tokens`` tokens (KV cache on, the prompt's prefill included) from
one fixed prompt, reported per generated token. Classifiers: one forward of a batch of eval inputs,
reported per input token. One warm-up, then the median of ``repeats`` timed runs.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from deltatune.delta import LoadedDelta
from deltatune.errors import DeltatuneError
from deltatune.quantize import dequantize_model, quantization_of

PLAIN_WEIGHT_METHODS = ("full", "freeze")
"""Methods whose delta already is plain weights: merging changes nothing (``can merge: n/a``)."""

FALLBACK_PROMPT = "Write one sentence about the sea."


@dataclass
class LatencyInputs:
    """What latency is measured on: chat messages for a causal LM, or (text, text pair) rows for a classifier."""

    messages: list[dict[str, str]] | None = None
    texts: list[tuple[str, str | None]] | None = None


def peak_memory_mb() -> dict[str, float | None]:
    """Return this process's peak resident set size and, on CUDA, the peak allocated GPU memory (MB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
    cuda = torch.cuda.max_memory_allocated() / 1e6 if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else None
    return {"rss_mb": rss_bytes / 1e6, "cuda_mb": cuda}


def median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Call ``fn`` once to warm up, then ``repeats`` times; return the median wall time of one call (s)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def classifier_ms_per_token(model: torch.nn.Module, tokenizer: Any, texts: list[tuple[str, str | None]],
                            max_length: int, repeats: int) -> tuple[float, int]:
    """Time one forward of ``texts`` as a padded batch; return (ms per non-padding input token, tokens)."""
    device = next(model.parameters()).device
    firsts = [a for a, _ in texts]
    pairs = [b for _, b in texts] if all(b is not None for _, b in texts) else None
    batch = tokenizer(firsts, pairs, padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(device)
    tokens = int(batch["attention_mask"].sum())
    seconds = median_seconds(lambda: model(**batch), repeats, device)
    return 1000 * seconds / max(tokens, 1), tokens


@torch.no_grad()
def generation_ms_per_token(model: torch.nn.Module, tokenizer: Any, messages: list[dict[str, str]],
                            new_tokens: int, repeats: int) -> tuple[float, int]:
    """Time greedy generation of exactly ``new_tokens`` tokens (KV cache on) after the rendered ``messages``;
    return (ms per generated token, prompt tokens)."""
    from deltatune.infer.generate import render_prompt

    device = next(model.parameters()).device
    batch = tokenizer([render_prompt(tokenizer, messages)], return_tensors="pt", add_special_tokens=False).to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def run() -> None:
        model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       use_cache=True, pad_token_id=pad)

    seconds = median_seconds(run, repeats, device)
    return 1000 * seconds / new_tokens, int(batch["input_ids"].shape[1])


def _time(delta: LoadedDelta, inputs: LatencyInputs, max_length: int, new_tokens: int,
          repeats: int) -> tuple[float, int]:
    model, tokenizer = delta.loaded.model, delta.loaded.tokenizer
    model.eval()
    if delta.info.task == "classification":
        return classifier_ms_per_token(model, tokenizer, inputs.texts or [(FALLBACK_PROMPT, None)], max_length,
                                       repeats)
    messages = inputs.messages or [{"role": "user", "content": FALLBACK_PROMPT}]
    return generation_ms_per_token(model, tokenizer, messages, new_tokens, repeats)


def merge_in_place(delta: LoadedDelta) -> None:
    """Fold the delta into the model's weights; a quantized base is de-quantized first (to the dtype of the
    unquantized embeddings), as ``deltatune merge`` does. Raises DeltatuneError when the method cannot merge."""
    model = delta.loaded.model
    if quantization_of(model):
        dequantize_model(model, model.get_input_embeddings().weight.dtype)
    delta.method.merge(model)


def measure_latency(delta: LoadedDelta, inputs: LatencyInputs, *, max_length: int = 512, new_tokens: int = 16,
                    repeats: int = 3) -> dict[str, Any]:
    """Time inference of ``delta`` unmerged, then merged where the method can merge (the model is changed
    in place). Returns ``{"unit", "unmerged_ms", "merged_ms" (None when it cannot merge), "can_merge"
    ("yes", "no" or "n/a" for plain-weight methods), "tokens" (prompt or input tokens), "note"}``."""
    unit = "ms per input token" if delta.info.task == "classification" else "ms per generated token"
    unmerged, tokens = _time(delta, inputs, max_length, new_tokens, repeats)
    figures: dict[str, Any] = {"unit": unit, "unmerged_ms": unmerged, "merged_ms": None, "can_merge": "no",
                               "tokens": tokens, "note": None}
    if delta.method.name in PLAIN_WEIGHT_METHODS:
        figures.update(merged_ms=unmerged, can_merge="n/a", note="the delta is plain weights already")
        return figures
    if not delta.method.mergeable:
        return figures
    try:
        merge_in_place(delta)
    except DeltatuneError as err:
        figures["note"] = str(err)
        return figures
    figures["merged_ms"], _ = _time(delta, inputs, max_length, new_tokens, repeats)
    figures["can_merge"] = "yes"
    return figures
