"""Continuous batching: requests join the running batch at the next decoding step and leave it when done.

    engine = Engine(bank, tokenizer, max_batch=16, max_queue=64)
    engine.start()
    engine.submit(Request(prompt_ids=ids, slot=bank.slot("dates"), params=params, emit=on_event))

One thread owns the model. Each turn of its loop it admits waiting requests (taking deltas in turns, so none
waits behind another's queue), runs each new request's prompt alone (prefill, with its own delta and, for
prompt tuning, its virtual tokens' cached keys and values in front), and then runs one decoding step for
every running request at once: one forward over an (n, 1) batch whose rows each apply their own delta (see
``rowwise``), reading and writing the batch's attention cache in place (``kv.KVSlots``).

Deltas whose method cannot be applied per row (bottleneck adapters, full fine-tuning, ...) each run on their own
view of the base (``bank``); the batch then holds one such delta's requests at a time. The running batch
belongs to one *group* (0: the base and every per-row delta; else one view); while requests of another
group wait, the running group admits no more, and when its batch has drained the group whose request has
waited longest goes next, so no delta starves.

transformers' own continuous batching (paged attention, all requests flattened into one packed sequence) is not
used: nothing in it tells a layer which request a token belongs to, which per-request deltas need, and it cannot
put prompt tuning's virtual tokens in front.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from deltatune.compute.precision import shape_step
from deltatune.methods.prompts_inject import kv_layout
from deltatune.serving.bank import DeltaBank
from deltatune.serving.kv import KVSlots
from deltatune.serving.rowwise import row_plan


class QueueFull(Exception):
    """The waiting queue is full (the HTTP layer answers 429 with Retry-After)."""


@dataclass
class SamplingParams:
    """How a request samples and when it stops."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class Event:
    """What a request produced since the last event: new text, and at the end the finish reason and counts."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Request:
    """One generation request; ``emit`` is called from the engine thread with each Event."""

    prompt_ids: list[int]
    slot: int
    params: SamplingParams
    emit: Callable[[Event], None]
    # set by Engine.submit from the delta in ``slot``: its prompt methods' cached prefix, and its batch group (0:
    # served per row with the base; else its slot, for a delta served on its own view)
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    group: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    sent: str = ""
    generator: torch.Generator | None = None
    submitted: float = field(default_factory=time.perf_counter)


class Engine:
    """The decoding loop over one base model and its deltas."""

    def __init__(self, bank: DeltaBank, tokenizer: Any, *, max_batch: int = 16, max_queue: int = 64) -> None:
        self.bank = bank
        self.model = bank.model
        self.tokenizer = tokenizer
        self.device = bank.loaded.device
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.stop_ids = _stop_ids(self.model, tokenizer)
        self._waiting: deque[Request] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._last_slot = -1
        self._calls: list[tuple[Callable[[], Any], Future[Any]]] = []
        # the running batch: its requests, their last tokens, their cache, and the group they belong to
        self._rows: list[Request] = []
        self._last = torch.zeros(0, dtype=torch.long)
        layers, kv_heads, head_dim = kv_layout(self.model.config)
        dtype = self.model.get_input_embeddings().weight.dtype
        self.kv = KVSlots(layers, kv_heads, head_dim, max_batch, dtype, self.device)
        self._boolean_mask = getattr(self.model.config, "_attn_implementation", "eager") == "sdpa"
        self._prefill_step = shape_step(self.device, dtype)

    # ---- outside the engine thread ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the decoding thread."""
        threading.Thread(target=self.run, name="deltatune-engine", daemon=True).start()

    def run(self) -> None:
        """Run the decoding loop in the calling thread until :meth:`stop`."""
        self._thread = threading.current_thread()
        self._loop()

    def submit(self, request: Request) -> None:
        """Queue ``request`` (its delta's prefix and batch group taken from the bank); raise QueueFull when
        ``max_queue`` requests already wait."""
        served = self.bank.by_slot(request.slot)
        request.prefix = served.prefix if served is not None else None
        request.group = served.group if served is not None else 0
        with self._cv:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (--max-queue {self.max_queue})")
            self._waiting.append(request)
            self._cv.notify()

    def busy(self) -> int:
        """Return the number of requests running or waiting."""
        with self._cv:
            return len(self._rows) + len(self._waiting)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let those in flight finish (up to ``timeout`` s, then cancel them), end the thread."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        deadline = time.monotonic() + timeout
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._cv:
            for request in [*self._waiting, *self._rows]:
                request.cancelled.set()
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---- the engine thread -----------------------------------------------------------------------------

    def between_steps(self, fn: Callable[[], Any], timeout: float = 120.0) -> Any:
        """Run ``fn`` in the engine thread between two decoding steps (never during a forward) and return its
        result or raise its exception; inline when the engine thread is not running."""
        if self._thread is None or not self._thread.is_alive():
            return fn()
        future: Future[Any] = Future()
        with self._cv:
            self._calls.append((fn, future))
            self._cv.notify()
        return future.result(timeout=timeout)

    def memory_mb(self) -> dict[str, Any]:
        """Return the MB the served tensors take: ``base``, ``deltas`` (together), ``per_delta``, ``kv_cache`` (now)
        and ``kv_cache_peak`` (the most it has taken)."""
        held = self.bank.memory()
        base = held.pop("base")
        return {"base": base / 2**20, "deltas": sum(held.values()) / 2**20,
                "per_delta": {name: b / 2**20 for name, b in held.items()}, "kv_cache": self.kv.nbytes() / 2**20,
                "kv_cache_peak": self.kv.peak_nbytes / 2**20}

    def in_flight(self, slot: int) -> int:
        """Return how many requests of delta ``slot`` are running or waiting."""
        with self._cv:
            return sum(1 for r in [*self._rows, *self._waiting] if r.slot == slot)

    def _run_calls(self) -> None:
        with self._cv:
            calls, self._calls = self._calls, []
        for fn, future in calls:
            try:
                future.set_result(fn())
            except Exception as err:  # the caller gets it
                future.set_exception(err)

    def _loop(self) -> None:
        while True:
            self._run_calls()
            with self._cv:
                while not self._waiting and not self._rows and not self._closing and not self._calls:
                    self._cv.wait(timeout=0.5)
                if self._closing and not self._waiting and not self._rows:
                    self._run_calls()
                    return
                admitted = self._admit()
            for request in admitted:
                try:
                    self._prefill(request)
                except Exception as err:  # a failing prompt ends its own request, never the server
                    request.emit(Event("", "error", len(request.prompt_ids), 0, error=f"{type(err).__name__}: {err}"))
            try:
                if self._rows:
                    self._decode_step()
            except Exception as err:  # a failing step ends the requests in it, never the server
                self._fail_all(f"{type(err).__name__}: {err}")

    def _admit(self) -> list[Request]:
        """Take waiting requests of the running group for the free batch places, one delta at a time in turn
        (call with the lock). Another group's waiting request closes admission until the batch has drained."""
        room = self.max_batch - len(self._rows)
        taken: list[Request] = []
        if not self._rows and not self._waiting:
            return taken
        group = self._rows[0].group if self._rows else self._waiting[0].group  # else the longest waiter's goes next
        if self._rows and any(r.group != group and not r.cancelled.is_set() for r in self._waiting):
            return taken  # another group waits: this batch drains first
        while room > 0:
            mine = [r for r in self._waiting if r.group == group]
            if not mine:
                break
            slots = sorted({r.slot for r in mine})
            slot = next((s for s in slots if s > self._last_slot), slots[0])
            request = next(r for r in mine if r.slot == slot)
            self._waiting.remove(request)
            self._last_slot = slot
            if request.cancelled.is_set():
                request.emit(Event("", "cancelled", len(request.prompt_ids), 0))
                continue
            taken.append(request)
            room -= 1
        return taken

    @torch.no_grad()
    def _prefill(self, request: Request) -> None:
        if request.params.seed is not None:
            request.generator = torch.Generator().manual_seed(request.params.seed)
        n = request.prefix[0][0].shape[2] if request.prefix else 0
        length = len(request.prompt_ids)
        cache = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in request.prefix]) \
            if request.prefix else DynamicCache()
        with row_plan(torch.tensor([request.slot])):
            logits = prefill(self.bank.model_of(request.group), request.prompt_ids, cache, n,
                             self._prefill_step, self.context, self.device)
        token = self._sample(logits, [request])[0]
        if self._advance(request, token, n + length + 1):
            return
        self.kv.append([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers])
        self._rows.append(request)
        self._last = torch.cat([self._last, torch.tensor([token])])

    @torch.no_grad()
    def _decode_step(self) -> None:
        slots = torch.tensor([r.slot for r in self._rows])
        cache = self.kv.step_cache()
        mask = self.kv.step_mask(self._boolean_mask)
        model = self.bank.model_of(self._rows[0].group)
        with row_plan(slots):
            out = model(input_ids=self._last[:, None].to(self.device), attention_mask=mask,
                        position_ids=self.kv.lengths[:, None].to(self.device), cache=cache, use_cache=True)
        self.kv.advance()
        tokens = self._sample(out.logits[:, -1], self._rows)
        done = [i for i, (request, token) in enumerate(zip(self._rows, tokens, strict=True))
                if self._advance(request, token, int(self.kv.lengths[i]) + 1)]
        self._last = torch.tensor(tokens, dtype=torch.long)
        if done:
            self._drop(done)

    def _drop(self, rows: list[int]) -> None:
        """Take ``rows`` out of the running batch."""
        order = self.kv.remove(rows)
        self._rows = [self._rows[i] for i in order]
        self._last = self._last[torch.tensor(order, dtype=torch.long)] if order else self._last[:0]
        if not self._rows:
            self.kv.shrink()  # an idle server holds no cache

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """Return the next token of each row: greedy at temperature 0, else top-p sampling (seeded per request)."""
        tokens = []
        logits = logits.float().cpu()
        for row, request in zip(logits, requests, strict=True):
            p = request.params
            if p.temperature <= 0:
                tokens.append(int(row.argmax()))
                continue
            probs = torch.softmax(row / p.temperature, dim=-1)
            if p.top_p < 1.0:
                ordered, order = probs.sort(descending=True)
                cut = ordered.cumsum(0) - ordered > p.top_p
                ordered[cut] = 0
                probs = torch.zeros_like(probs).scatter_(0, order, ordered)
            tokens.append(int(torch.multinomial(probs / probs.sum(), 1, generator=request.generator)))
        return tokens

    def _advance(self, request: Request, token: int, used: int) -> bool:
        """Record ``token`` for ``request``, emit the new text; return True when the request is finished."""
        if request.cancelled.is_set():
            request.emit(Event("", "cancelled", len(request.prompt_ids), len(request.generated)))
            return True
        finish = None
        if token in self.stop_ids and not request.params.ignore_eos:
            finish = "stop"
        else:
            request.generated.append(token)
        text = self.tokenizer.decode(request.generated, skip_special_tokens=True)
        for stop in request.params.stop:
            at = text.find(stop)
            if stop and at >= 0:
                text, finish = text[:at], "stop"
        if finish is None and (len(request.generated) >= request.params.max_tokens or used >= self.context):
            finish = "length"
        if finish is None:
            text = text[: len(text) - _held_back(text, request.params.stop)]
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
                text = text[:-1]
        new = text[len(request.sent):] if text.startswith(request.sent) else ""
        request.sent += new
        if new or finish is not None:
            request.emit(Event(new, finish, len(request.prompt_ids), len(request.generated)))
        return finish is not None

    def _fail_all(self, message: str) -> None:
        for request in self._rows:
            request.emit(Event("", "error", len(request.prompt_ids), len(request.generated), error=message))
        self._drop(list(range(len(self._rows))))


def prefill(model: Any, prompt_ids: list[int], cache: DynamicCache, offset: int, step: int, context: int,
            device: torch.device) -> torch.Tensor:
    """Run ``prompt_ids`` (positions ``offset``...) through ``model`` into ``cache``; return the logits (1, V) of
    the prompt's last token.

    With ``step`` > 1 the prompt is padded at the end to a multiple of ``step`` tokens and the cache cut back to the
    prompt afterwards (causal attention never lets a prompt token see the padding): on a CPU the bf16 matmuls keep
    compiled code for every shape they meet (``precision.SHAPE_STEP``; about 2.8 MB per new prompt length for
    SmolLM2), so a server that met every prompt length would grow by gigabytes; rounded, it meets at most
    context / ``step`` lengths.
    The padding never reaches past ``context`` positions."""
    length = len(prompt_ids)
    pad = min(-length % step, max(context - offset - length, 0))
    ids = torch.tensor([prompt_ids + prompt_ids[-1:] * pad], device=device)
    total = offset + length + pad
    out = model(input_ids=ids, attention_mask=torch.ones(1, total, dtype=torch.long, device=device),
                position_ids=torch.arange(offset, total, device=device)[None], cache=cache, use_cache=True,
                logits_to_keep=pad + 1)
    if pad:
        cache.crop(-pad)  # transformers 5: a negative count removes that many tokens from the end
    logits: torch.Tensor = out.logits[:, 0]
    return logits


def _held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string (not sent yet)."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                held = max(held, k)
                break
    return held


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """The token ids that end a reply: the tokenizer's eos and the model's generation config eos ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return ids
