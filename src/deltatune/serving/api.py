"""The OpenAI-compatible HTTP API over the engine (FastAPI): the official ``openai`` client works unchanged.

    GET  /health                     {"status": "ok", "deltas": N, "busy": M, "memory_mb": {...}}
    GET  /v1/models                  the base and every delta
    POST /v1/chat/completions        messages -> reply (``stream``: server-sent events, ``data: [DONE]`` last)
    POST /v1/completions             prompt -> continuation

``model`` chooses the delta (or the base). ``tools`` (OpenAI's function schemas) are rendered as the model was trained
with them (``data/tools.py``); a reply that calls functions comes back as ``message.tool_calls`` (with ids) and
``finish_reason: "tool_calls"``, and a reply whose call does not parse comes back as text. With tools, a streamed
reply is sent when it is complete (its calls are parsed first). ``tool_choice: "none"`` renders no tools.

Errors have OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``: 400 for a malformed body or value
or a prompt longer than the context, 401 for a missing or wrong key (when the server has one; the key is never
logged), 404 for an unknown model, 429 with ``Retry-After`` when the queue is full.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deltatune.data.tools import normalize_tools, parse_tool_calls
from deltatune.errors import DataError, DeltatuneError
from deltatune.infer.generate import render_prompt
from deltatune.serving.engine import Engine, Event, QueueFull, SamplingParams
from deltatune.serving.engine import Request as EngineRequest


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        """Return the error as a JSON response."""
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class Message(BaseModel):
    """A chat message (text content; a list of text parts is joined)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The message as data/formats parses it (developer is a system message)."""
        item: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        item.update({k: v for k, v in (("tool_calls", self.tool_calls), ("tool_call_id", self.tool_call_id),
                                       ("name", self.name)) if v is not None})
        return item

    def text(self) -> str:
        """Return the message's text."""
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return self.content or ""


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields deltatune ignores (user, metadata...)
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=1)
    ignore_eos: bool = False  # vLLM's extension: decode max_tokens whatever the model says (benchmarks)

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def params(self, default_tokens: int) -> SamplingParams:
        """Return the engine's sampling parameters."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=self.tokens() or default_tokens, temperature=self.temperature,
                              top_p=self.top_p, seed=self.seed, stop=stop, ignore_eos=self.ignore_eos)

    def tokens(self) -> int | None:
        """Return the requested completion length."""
        return self.max_tokens


class ChatBody(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def schemas(self) -> list[dict[str, Any]] | None:
        """The request's function schemas, checked; None without tools or with ``tool_choice: "none"``."""
        if not self.tools or self.tool_choice == "none":
            return None
        try:
            return normalize_tools(self.tools, "tools")
        except DataError as err:
            raise ApiError(400, str(err), param="tools") from None

    def tokens(self) -> int | None:
        """Return ``max_completion_tokens`` (newer clients) or ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


class CompletionBody(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str]

    def text(self) -> str:
        """Return the single prompt."""
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ApiError(400, "give one prompt (a string, or a list of one)", param="prompt")
            return self.prompt[0]
        return self.prompt


class LoadDeltaBody(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's shape; a delta of any method)."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadDeltaBody(BaseModel):
    """POST /v1/unload_lora_adapter."""

    model_config = ConfigDict(extra="allow")
    lora_name: str = Field(min_length=1)


def build_app(engine: Engine, *, api_key: str | None = None, default_max_tokens: int = 256,
              delta_root: Path | None = None) -> FastAPI:
    """Return the FastAPI application serving ``engine``'s base and deltas. With ``delta_root`` deltas can be
    added and removed while running (vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``), from
    folders under that root only."""
    app = FastAPI(title="deltatune serve", docs_url=None, redoc_url=None)
    bank, tokenizer = engine.bank, engine.tokenizer
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not secrets.compare_digest(given.encode(), api_key.encode()):
                return ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                kind="authentication_error", code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "deltas": len(bank.deltas), "busy": engine.busy(), "memory_mb": engine.memory_mb()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = [bank.base_name, *list(bank.deltas)]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "deltatune"}
                                           for n in names]}

    @app.post("/v1/load_lora_adapter")
    async def load_delta(request: Request) -> Any:
        body = await _parse(request, LoadDeltaBody)
        root = _updates_allowed(delta_root)
        folder = Path(body.lora_path).expanduser().resolve()
        if not folder.is_relative_to(root):
            raise ApiError(400, f"lora_path must be a folder under the server's --delta-root {root}",
                           param="lora_path")
        try:
            await asyncio.to_thread(engine.between_steps, lambda: bank.add(body.lora_name, folder))
        except DeltatuneError as err:
            raise ApiError(400, str(err), param="lora_path") from None
        return PlainTextResponse(f"Success: delta {body.lora_name!r} added.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_delta(request: Request) -> Any:
        body = await _parse(request, UnloadDeltaBody)
        _updates_allowed(delta_root)
        if body.lora_name not in bank.deltas:
            raise ApiError(404, f"no delta named {body.lora_name!r}", param="lora_name", code="model_not_found")
        def remove() -> None:  # in the engine thread: no request of it can start or run meanwhile
            busy = engine.in_flight(bank.deltas[body.lora_name].slot)
            if busy:
                raise ApiError(400, f"{body.lora_name!r} has {busy} requests in flight; retry when they are done",
                               param="lora_name")
            bank.remove(body.lora_name)

        await asyncio.to_thread(engine.between_steps, remove)
        return PlainTextResponse(f"Success: delta {body.lora_name!r} removed.")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await _parse(request, ChatBody)
        system = _system_of(bank, body.model)
        messages = [m.as_dict() for m in body.messages]
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        tools = body.schemas()
        try:
            prompt = render_prompt(tokenizer, messages, tools)
        except DataError as err:
            raise ApiError(400, str(err), param="messages") from None
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return await _run(body, ids, chat=True, tools=tools is not None)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await _parse(request, CompletionBody)
        ids = tokenizer(body.text(), add_special_tokens=False)["input_ids"]
        return await _run(body, ids, chat=False)

    async def _run(body: _Sampling, ids: list[int], *, chat: bool, tools: bool = False) -> Any:
        slot = _slot(bank, body.model)
        served = bank.by_slot(slot)
        prefix = served.prefix if served is not None else None
        virtual = prefix[0][0].shape[2] if prefix else 0
        params = body.params(default_max_tokens)
        if not ids:
            raise ApiError(400, "the prompt is empty", param="messages" if chat else "prompt")
        if virtual + len(ids) + 1 > engine.context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this model's context is {engine.context}",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        events: asyncio.Queue[Event] = asyncio.Queue()
        box = mailbox(asyncio.get_running_loop())
        job = EngineRequest(prompt_ids=ids, slot=slot, params=params, emit=lambda event: box.post(events, event))
        try:
            engine.submit(job)
        except QueueFull as err:
            raise ApiError(429, f"the server is busy: {err}; retry shortly", kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(events, job, rid, body.model, chat, usage, tools),
                                     media_type="text/event-stream")
        text, last = "", Event("")
        try:
            while last.finish_reason is None:
                last = await events.get()
                text += last.text
        except asyncio.CancelledError:  # the client went away: free its batch place
            job.cancelled.set()
            raise
        if last.finish_reason == "error":
            raise ApiError(500, f"generation failed: {last.error}", kind="server_error")
        choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(last)}
        if chat:
            choice["message"], calls = _assistant_message(text, tools)
            if calls:
                choice["finish_reason"] = "tool_calls"
        else:
            choice.update({"text": text, "logprobs": None})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": body.model, "choices": [choice], "usage": _usage(last)}

    return app


class Mailbox:
    """Hands the engine thread's events to the event loop, waking the loop once for all the events one decoding
    step gives (not once per request: on a small CPU each wake-up takes time from the decoding threads)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Event], Event]] = []
        self._scheduled = False

    def post(self, queue: asyncio.Queue[Event], event: Event) -> None:
        """Queue ``event`` for ``queue`` (from any thread)."""
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for queue, event in pending:
            queue.put_nowait(event)


_MAILBOXES: dict[asyncio.AbstractEventLoop, Mailbox] = {}


def mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    """Return the Mailbox of ``loop`` (one per event loop)."""
    if loop not in _MAILBOXES:
        _MAILBOXES.clear()  # a new loop (a restarted server): the old one's box is done
        _MAILBOXES[loop] = Mailbox(loop)
    return _MAILBOXES[loop]


def _drain(queue: asyncio.Queue[Event]) -> list[Event]:
    """Take every event already waiting in ``queue``."""
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


def _merged(events: list[Event]) -> Event:
    """One event carrying the text of ``events`` in order, and the last one's finish and counts."""
    last = events[-1]
    if len(events) == 1:
        return last
    return Event("".join(e.text for e in events), last.finish_reason, last.prompt_tokens, last.completion_tokens,
                 last.error)


def _updates_allowed(root: Path | None) -> Path:
    if root is None:
        raise ApiError(404, "adding and removing deltas is off; start the server with --allow-delta-updates "
                            "--delta-root DIR", code="not_enabled")
    return root.resolve()


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    """Read and validate a JSON body; raise ApiError 400 naming the field."""
    try:
        raw = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{param}: {first['msg']}", param=param) from None


def _slot(bank: Any, name: str) -> int:
    try:
        return bank.slot(name)
    except KeyError:
        known = ", ".join([bank.base_name, *bank.deltas])
        raise ApiError(404, f"the model {name!r} does not exist; this server has {known}", param="model",
                       code="model_not_found") from None


def _system_of(bank: Any, name: str) -> str | None:
    """The system prompt a delta was trained with (run.yaml's data.system_prompt), added when a chat has none."""
    _slot(bank, name)
    delta = bank.deltas.get(name)
    return delta.system_prompt if delta is not None else None


def _finish(event: Event) -> str:
    return "length" if event.finish_reason == "length" else "stop"


def _assistant_message(text: str, tools: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The reply as an OpenAI assistant message, and its calls: with tools, calls that parse become
    ``tool_calls`` (the text around them the content, None when empty); anything else stays text."""
    parsed = parse_tool_calls(text) if tools else None
    if parsed is None or not parsed.calls or parsed.malformed:
        return {"role": "assistant", "content": text}, []
    calls = [call.openai() for call in parsed.calls]
    return {"role": "assistant", "content": parsed.content or None, "tool_calls": calls}, calls


def _usage(event: Event) -> dict[str, int]:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


async def _stream(events: asyncio.Queue[Event], job: EngineRequest, rid: str, model: str, chat: bool,
                  usage: bool, tools: bool = False) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; a client that disconnects cancels its request. With ``tools``
    the reply is held until it is complete, then sent as one content chunk or as its tool calls."""
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else \
                ({"content": text} if text else {})
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": model,
                                      "choices": [choice]}) + "\n\n"

    held: list[Event] = []
    try:
        if chat:
            yield chunk(None, None, first=True)
        while True:
            event = _merged([await events.get(), *_drain(events)])  # a slow reader gets what piled up at once
            if tools and event.finish_reason is None:
                held.append(event)
                continue
            if tools and event.finish_reason != "error":
                event = _merged([*held, event])
                message, calls = _assistant_message(event.text, True)
                if calls:
                    deltas = [{"index": k, **call} for k, call in enumerate(calls)]
                    yield "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": model,
                                                 "choices": [{"index": 0, "delta": {"tool_calls": deltas},
                                                              "finish_reason": None}]}) + "\n\n"
                    event = Event(message["content"] or "", "tool_calls", event.prompt_tokens,
                                  event.completion_tokens)
            if event.finish_reason == "error":
                body = {"error": {"message": f"generation failed: {event.error}", "type": "server_error",
                                  "param": None, "code": None}}
                yield "data: " + json.dumps(body) + "\n\n"
                break
            if event.text:
                yield chunk(event.text, None)
            if event.finish_reason is not None:
                yield chunk(None, "tool_calls" if event.finish_reason == "tool_calls" else _finish(event))
                if usage:
                    yield "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": model,
                                                 "choices": [], "usage": _usage(event)}) + "\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnected mid-stream: free its batch place at once
        job.cancelled.set()
