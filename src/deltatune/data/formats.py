"""Turn raw records into examples: chat formats become messages, plain text and classification stay text.

    fmt = detect_format(record, "train.jsonl:1")        # "alpaca"
    examples = to_examples(records, "auto", system_prompt="Be brief.")

Formats and the fields they need:

- ``alpaca``: ``instruction``, ``output``, optional ``input`` and ``system``
- ``messages``: ``messages``: [{role: system|user|assistant|tool, content, weight?: 0|1}] (OpenAI style), with
  tool calling as OpenAI writes it: assistant ``tool_calls`` [{id, type, function: {name, arguments}}], ``tool``
  messages with ``tool_call_id``, and the record's ``tools`` (function schemas)
- ``sharegpt``: ``conversations``: [{from: human|user|gpt|assistant|chatgpt|system|function_call|observation,
  value}], optional ``system``; ``function_call`` turns hold ``{"name", "arguments"}`` (JSON), ``observation``
  turns the result, ``tools`` a list of schemas or a JSON string of one (LLaMA-Factory's shape)
- ``prompt_completion``: ``prompt``, ``completion`` (one user turn, one assistant turn)
- ``classification``: ``label`` plus ``text`` or ``sentence`` (or ``sentence1``/``sentence2``)
- ``text``: ``text`` only (plain language modelling)

Preference pairs (for ``train.objective`` dpo, ipo, simpo, orpo): a prompt and two replies, the preferred
(``chosen``) and the other (``rejected``):

- ``preference``: ``chosen`` and ``rejected`` as strings with a ``prompt`` string (TRL's standard shape), as
  message lists with ``prompt`` a message list (TRL's conversational shape), or as whole conversations with no
  ``prompt`` (TRL's implicit prompt: the shared leading messages are the prompt, the last assistant turn of each
  is the reply)
- ``sharegpt_preference``: ``conversations`` (the prompt, ShareGPT turns) + ``chosen`` and ``rejected`` as one
  ``{from, value}`` turn each (LLaMA-Factory's shape), optional ``system``
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from deltatune.data.tools import (
    ToolCall,
    normalize_tools,
    parse_call,
    parse_json,
    parse_openai_call,
    tool_names,
)
from deltatune.errors import DataError

FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "classification", "text", "preference",
           "sharegpt_preference")
PREFERENCE_FORMATS = frozenset({"preference", "sharegpt_preference"})
CHAT_FORMATS = frozenset({"alpaca", "messages", "sharegpt", "prompt_completion"})
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system", "function_call": "assistant", "observation": "tool"}
ON_INVALID = ("error", "skip")


@dataclass
class Message:
    """One turn of a conversation; ``weight`` 0 excludes an assistant turn from the loss (OpenAI style).

    An assistant turn may carry ``tool_calls``; a ``tool`` turn is one call's result (``tool_call_id``, and the
    called function's ``name``)."""

    role: str
    content: str
    weight: float | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


@dataclass
class Example:
    """One training example before tokenization; ``origin`` is ``path:line`` for error messages.

    A preference pair has ``messages`` (the prompt, ending with a user turn) and ``chosen`` / ``rejected``
    (the two assistant replies)."""

    origin: str
    messages: list[Message] | None = None
    text: str | None = None
    text_pair: str | None = None
    label: int | str | None = None
    chosen: Message | None = None
    rejected: Message | None = None
    tools: list[dict[str, Any]] | None = None  # function schemas, OpenAI's {type: function, function: {...}}

    @property
    def is_pair(self) -> bool:
        """True for a preference pair."""
        return self.chosen is not None


def detect_format(record: dict[str, Any], origin: str) -> str:
    """Tell an example's format from its fields; returns one of FORMATS or raises DataError."""
    fields = set(record)
    if {"chosen", "rejected"} <= fields:
        return "sharegpt_preference" if "conversations" in fields else "preference"
    if "messages" in fields and isinstance(record["messages"], list):
        return "messages"
    if "conversations" in fields and isinstance(record["conversations"], list):
        return "sharegpt"
    if {"instruction", "output"} <= fields:
        return "alpaca"
    if {"prompt", "completion"} <= fields:
        return "prompt_completion"
    if "label" in fields and fields & {"text", "sentence", "sentence1"}:
        return "classification"
    if "text" in fields:
        return "text"
    raise DataError(f"{origin}: cannot tell the format from fields {sorted(fields)}; set data.format to one "
                    f"of {', '.join(FORMATS)} (see `deltatune config` for the fields each needs)")


def _field(record: dict[str, Any], key: str, origin: str, *, required: bool = True,
           allow_empty: bool = False) -> str | None:
    """A string field: missing, non-string or (unless allowed) blank values raise DataError."""
    value = record.get(key)
    if value is None:
        if required:
            raise DataError(f"{origin}: missing field {key!r} (fields: {sorted(record)}); add it, "
                            "or set data.format if the format was detected wrongly")
        return None
    if not isinstance(value, str):
        raise DataError(f"{origin}: field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{origin}: field {key!r} is empty; give it text or remove the example")
    return value


def _weight(value: Any, role: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
        raise DataError(f"{where}: weight must be 0 or 1, got {value!r}")
    if role != "assistant":
        raise DataError(f"{where}: weight is only allowed on assistant messages (this one is {role}); "
                        "remove it")
    return float(value)


def _check_turns(messages: list[Message], origin: str) -> list[Message]:
    if not any(m.role == "assistant" for m in messages):
        raise DataError(f"{origin}: no assistant message, so nothing to learn; add an assistant turn "
                        "or remove the example")
    return messages


def _link_tool_turns(messages: list[Message], tools: list[dict[str, Any]] | None, origin: str, key: str
                     ) -> list[Message]:
    """Check a conversation's calls and results: every result answers a call made before it (its id, or the oldest
    unanswered call), every called function is among the schemas (when the record has any)."""
    known = tool_names(tools)
    pending: list[ToolCall] = []
    for i, m in enumerate(messages):
        where = f"{origin}: {key}[{i}]"
        for call in m.tool_calls or []:
            call.id = call.id or f"call_{i}_{len(pending)}"  # ShareGPT calls have none: results must name theirs
            if tools is not None and call.name not in known:
                raise DataError(f"{where}: calls {call.name!r}, which is not among the record's tools "
                                f"({', '.join(sorted(known)) or 'none'}); add its schema or fix the name")
            pending.append(call)
        if m.role != "tool":
            continue
        if not pending:
            raise DataError(f"{where}: a tool result with no function call before it; put the assistant's call "
                            "first or remove the result")
        match = next((c for c in pending if m.tool_call_id and c.id == m.tool_call_id), None)
        if m.tool_call_id and match is None and any(c.id for c in pending):
            raise DataError(f"{where}: tool_call_id {m.tool_call_id!r} answers no earlier call")
        call = match or pending[0]
        pending.remove(call)
        m.name = m.name or call.name
        m.tool_call_id = m.tool_call_id or call.id
    return messages


def _record_tools(record: dict[str, Any], origin: str) -> list[dict[str, Any]] | None:
    raw = record.get("tools")
    return None if raw is None else normalize_tools(raw, origin)


def _message_list(raw: Any, key: str, origin: str) -> list[Message]:
    """Parse a list of ``{role, content}`` objects held in field ``key``; raises DataError naming the item."""
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{origin}: field {key!r} must be a non-empty list of {{role, content}}")
    messages = []
    for i, item in enumerate(raw):
        where = f"{origin}: {key}[{i}]"
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected an object {{role, content}}, got {type(item).__name__}")
        role = item.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: unknown role {role!r}; use one of {', '.join(ROLES)}")
        raw_calls = item.get("tool_calls") if role == "assistant" else None
        if raw_calls is not None and (not isinstance(raw_calls, list) or not raw_calls):
            raise DataError(f"{where}: tool_calls must be a non-empty list of calls")
        calls = [parse_openai_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(raw_calls or [])]
        content = _field(item, "content", where, required=not calls, allow_empty=bool(calls)) or ""
        message = Message(role, content, _weight(item.get("weight"), role, where), tool_calls=calls or None)
        if role == "tool":
            call_id = item.get("tool_call_id")
            message.tool_call_id = call_id if isinstance(call_id, str) else None
            message.name = item.get("name") if isinstance(item.get("name"), str) else None
        messages.append(message)
    return messages


def parse_messages(raw: list[Any], tools: list[dict[str, Any]] | None = None, origin: str = "messages"
                   ) -> list[Message]:
    """Parse OpenAI-style chat messages (tool calls and results included, linked and checked against ``tools``)
    into Messages; raises DataError naming the bad message."""
    return _link_tool_turns(_message_list(raw, "messages", origin), tools, origin, "messages")


def _from_messages(record: dict[str, Any], origin: str) -> list[Message]:
    messages = _check_turns(_message_list(record.get("messages"), "messages", origin), origin)
    return _link_tool_turns(messages, _record_tools(record, origin), origin, "messages")


def _sharegpt_turn(item: Any, where: str) -> Message:
    """One ShareGPT ``{from, value}`` turn as a Message; raises DataError naming ``where``."""
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected an object {{from, value}}, got {type(item).__name__}")
    speaker = item.get("from")
    if speaker not in SHAREGPT_ROLES:
        raise DataError(f"{where}: unknown speaker {speaker!r}; use one of {', '.join(SHAREGPT_ROLES)}")
    value = _field(item, "value", where)
    assert value is not None
    role = SHAREGPT_ROLES[speaker]
    if speaker == "function_call":  # one call, or a list of parallel calls
        parsed = parse_json(value, where, "the function call")
        calls = [parse_call(c, where) for c in parsed] if isinstance(parsed, list) else [parse_call(parsed, where)]
        return Message("assistant", "", _weight(item.get("weight"), role, where), tool_calls=calls)
    return Message(role, value, _weight(item.get("weight"), role, where))


def _sharegpt_turns(record: dict[str, Any], origin: str) -> list[Message]:
    raw = record.get("conversations")
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{origin}: field 'conversations' must be a non-empty list of {{from, value}}")
    system = _field(record, "system", origin, required=False, allow_empty=True)
    messages = [Message("system", system)] if system and system.strip() else []
    return messages + [_sharegpt_turn(item, f"{origin}: conversations[{i}]") for i, item in enumerate(raw)]


def _from_sharegpt(record: dict[str, Any], origin: str) -> list[Message]:
    messages = _check_turns(_sharegpt_turns(record, origin), origin)
    return _link_tool_turns(messages, _record_tools(record, origin), origin, "conversations")


def _check_prompt(prompt: list[Message], origin: str) -> list[Message]:
    if not prompt or prompt[-1].role != "user":
        raise DataError(f"{origin}: the prompt of a preference pair must end with a user turn (it ends with "
                        f"{prompt[-1].role if prompt else 'nothing'}); fix the record or remove it")
    return prompt


def _reply(messages: list[Message], key: str, origin: str) -> Message:
    if len(messages) != 1 or messages[0].role != "assistant":
        raise DataError(f"{origin}: field {key!r} must hold exactly one assistant reply after the prompt, got "
                        f"{[m.role for m in messages]}; put earlier turns in the prompt")
    return Message("assistant", messages[0].content)


def _from_preference(record: dict[str, Any], origin: str) -> Example:
    """TRL's preference shapes: strings with a prompt, message lists with a prompt, or implicit prompt."""
    chosen, rejected, prompt = record.get("chosen"), record.get("rejected"), record.get("prompt")
    if isinstance(chosen, str) or isinstance(rejected, str):
        text = _field(record, "prompt", origin)
        c, r = _field(record, "chosen", origin), _field(record, "rejected", origin)
        assert text is not None and c is not None and r is not None
        return Example(origin, messages=[Message("user", text)], chosen=Message("assistant", c),
                       rejected=Message("assistant", r))
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise DataError(f"{origin}: 'chosen' and 'rejected' must both be strings or both lists of "
                        "{role, content}")
    c_msgs = _message_list(chosen, "chosen", origin)
    r_msgs = _message_list(rejected, "rejected", origin)
    if prompt is None:  # implicit prompt: the leading messages both conversations share
        shared = 0
        while (shared < min(len(c_msgs), len(r_msgs)) - 1 and c_msgs[shared].role == r_msgs[shared].role
               and c_msgs[shared].content == r_msgs[shared].content):
            shared += 1
        p_msgs, c_msgs, r_msgs = c_msgs[:shared], c_msgs[shared:], r_msgs[shared:]
    elif isinstance(prompt, str):
        p_msgs = [Message("user", _field(record, "prompt", origin) or "")]
    else:
        p_msgs = _message_list(prompt, "prompt", origin)
    return Example(origin, messages=_check_prompt(p_msgs, origin), chosen=_reply(c_msgs, "chosen", origin),
                   rejected=_reply(r_msgs, "rejected", origin))


def _from_sharegpt_preference(record: dict[str, Any], origin: str) -> Example:
    """LLaMA-Factory's shape: ``conversations`` is the prompt, ``chosen``/``rejected`` one turn each."""
    prompt = _check_prompt(_sharegpt_turns(record, origin), origin)
    replies = []
    for key in ("chosen", "rejected"):
        turn = _sharegpt_turn(record.get(key), f"{origin}: {key}")
        if turn.role != "assistant":
            raise DataError(f"{origin}: {key} must be the assistant's turn (from: gpt), got from a {turn.role}")
        replies.append(Message("assistant", turn.content))
    return Example(origin, messages=prompt, chosen=replies[0], rejected=replies[1])


def _from_alpaca(record: dict[str, Any], origin: str) -> list[Message]:
    instruction = _field(record, "instruction", origin)
    extra = _field(record, "input", origin, required=False, allow_empty=True)
    output = _field(record, "output", origin)
    system = _field(record, "system", origin, required=False, allow_empty=True)
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else str(instruction)
    messages = [Message("system", system)] if system and system.strip() else []
    return [*messages, Message("user", user), Message("assistant", str(output))]


def _from_prompt_completion(record: dict[str, Any], origin: str) -> list[Message]:
    prompt = _field(record, "prompt", origin)
    completion = _field(record, "completion", origin)
    return [Message("user", str(prompt)), Message("assistant", str(completion))]


def _label(value: Any, origin: str) -> int | str:
    if value is None:
        raise DataError(f"{origin}: missing field 'label'; give every example a label")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(f"{origin}: label must be an integer or a string, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise DataError(f"{origin}: label must be an integer or a string, got {value!r}")
        return int(value)
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{origin}: label is empty; give every example a label")
    return value


def _classification(record: dict[str, Any], origin: str) -> Example:
    key = next((k for k in ("text", "sentence", "sentence1") if k in record), "text")
    text = _field(record, key, origin)
    pair_key = next((k for k in ("text_pair", "sentence2") if record.get(k) is not None), None)
    pair = _field(record, pair_key, origin) if pair_key else None
    return Example(origin, text=text, text_pair=pair, label=_label(record.get("label"), origin))


_CHAT_READERS = {"alpaca": _from_alpaca, "messages": _from_messages, "sharegpt": _from_sharegpt,
                 "prompt_completion": _from_prompt_completion}
_PAIR_READERS = {"preference": _from_preference, "sharegpt_preference": _from_sharegpt_preference}


def to_example(record: dict[str, Any], origin: str, fmt: str, *, system_prompt: str | None = None) -> Example:
    """Convert one record in a known format to an Example, validating it; raises DataError with origin."""
    if fmt in _CHAT_READERS or fmt in _PAIR_READERS:
        example = (Example(origin, messages=_CHAT_READERS[fmt](record, origin)) if fmt in _CHAT_READERS
                   else _PAIR_READERS[fmt](record, origin))
        if fmt in ("messages", "sharegpt"):
            example.tools = _record_tools(record, origin)
        assert example.messages is not None
        if system_prompt and example.messages[0].role != "system":
            example.messages.insert(0, Message("system", system_prompt))
        return example
    if fmt == "classification":
        return _classification(record, origin)
    if fmt == "text":
        return Example(origin, text=_field(record, "text", origin))
    raise DataError(f"unknown data.format {fmt!r}; use auto or one of {', '.join(FORMATS)}")


def to_examples(records: Iterable[tuple[str, dict[str, Any]]], fmt: str = "auto", *,
                system_prompt: str | None = None, skipped: list[str] | None = None) -> list[Example]:
    """Convert ``(origin, record)`` pairs to Examples of one format, validating each record.

    ``auto`` detects the format once from the first record; every record must then fit that format.
    Returns the examples in order; raises DataError naming the record's origin on the first bad one, or, given a
    ``skipped`` list (``data.on_invalid: skip``), appends each bad record's error to it and goes on.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown data.format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
    examples: list[Example] = []
    detected_at = ""
    for origin, record in records:
        if fmt == "auto":
            fmt, detected_at = detect_format(record, origin), origin
        try:
            examples.append(to_example(record, origin, fmt, system_prompt=system_prompt))
        except DataError as err:
            if skipped is not None:
                skipped.append(str(err))
                continue
            if detected_at and detected_at != origin:
                raise DataError(f"{err} (the format was detected as {fmt} from {detected_at}; every "
                                "example must have that format, or set data.format)") from None
            raise
    return examples
