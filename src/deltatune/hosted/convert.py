"""Convert deltatune Examples into the JSONL rows each hosted service trains on.

    rows = to_openai(example)       # {"messages": [{"role", "content", "weight"?}, ...]}
    rows = to_vertex(example)       # {"systemInstruction": {...}, "contents": [{"role", "parts"}, ...]}

Every deltatune data format converts: the chat formats (alpaca, messages, sharegpt, prompt_completion)
keep their turns; ``classification`` becomes one user turn (the text, and the pair on a second paragraph)
and one assistant turn (the label as text). ``text`` has no turns to learn a reply from, so it is
rejected with a DataError.

Preference pairs (``preference``, ``sharegpt_preference``) become each provider's preference rows: OpenAI's DPO
shape (``input.messages``, ``preferred_output``, ``non_preferred_output``) and Vertex AI's preference tuning shape
(``contents`` ending with a user turn, ``completions`` with scores 1 and 0).

OpenAI keeps the per-turn ``weight`` (0 or 1 on assistant turns). Vertex AI has no per-turn weight: a
weight-0 assistant turn is kept as an ordinary ``model`` turn, so the conversation stays intact, and
Vertex trains on it like every other model turn. :func:`weight0_turns` counts them so callers can warn.
"""

from __future__ import annotations

import json
from typing import Any

from deltatune.data import Example, Message
from deltatune.errors import DataError

PROVIDERS = ("openai", "vertex")
VERTEX_ROLES = {"user": "user", "assistant": "model"}


def chat_messages(example: Example) -> list[Message]:
    """Return the example's turns; classification becomes user text -> assistant label.

    Raises DataError for plain ``text`` examples, which have no assistant turn.
    """
    if example.is_pair:  # every turn a provider reads or counts: the prompt and both replies
        assert example.messages is not None and example.chosen is not None and example.rejected is not None
        return [*example.messages, example.chosen, example.rejected]
    if example.messages is not None:
        return example.messages
    if example.label is not None and example.text is not None:
        user = example.text if example.text_pair is None else f"{example.text}\n\n{example.text_pair}"
        return [Message("user", user), Message("assistant", str(example.label))]
    raise DataError(f"{example.origin}: plain-text examples have no assistant turn to learn from; hosted "
                    "fine-tuning needs chat data (messages, alpaca, sharegpt, prompt_completion or "
                    "classification)")


def to_openai(example: Example) -> dict[str, Any]:
    """Return one OpenAI chat fine-tuning row: ``{"messages": [...]}`` with ``weight`` where set; a preference
    pair becomes a DPO row: ``{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output":
    [...]}``."""
    if example.is_pair:
        assert example.messages is not None and example.chosen is not None and example.rejected is not None
        return {"input": {"messages": [{"role": m.role, "content": m.content} for m in example.messages]},
                "preferred_output": [{"role": "assistant", "content": example.chosen.content}],
                "non_preferred_output": [{"role": "assistant", "content": example.rejected.content}]}
    messages = []
    for m in chat_messages(example):
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:  # OpenAI's shape: arguments as a JSON string, content null when there is no text
            item.update(content=m.content or None, tool_calls=[c.openai() for c in m.tool_calls])
        if m.role == "tool":
            item["tool_call_id"] = m.tool_call_id
        if m.weight is not None:
            item["weight"] = int(m.weight)
        messages.append(item)
    row: dict[str, Any] = {"messages": messages}
    if example.tools:
        row["tools"] = example.tools
    return row


def to_vertex(example: Example) -> dict[str, Any]:
    """Return one Vertex AI (Gemini) tuning row: ``contents`` plus ``systemInstruction`` when there is one.

    Leading system messages join into ``systemInstruction``; user -> ``user``, assistant -> ``model``.
    Weight-0 assistant turns become ordinary ``model`` turns (Vertex has no per-turn weight). Raises
    DataError for a system message after the conversation has started (Vertex has no system turns).
    """
    messages = example.messages if example.is_pair and example.messages is not None else chat_messages(example)
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if m.role == "system":
            if contents:
                raise DataError(f"{example.origin}: messages[{i}]: a system message inside the conversation; "
                                "Vertex AI takes one system instruction before the first turn, so move it "
                                "to the start")
            system.append(m.content)
            continue
        if m.role == "tool":  # Gemini: a user turn of functionResponse parts (consecutive results share it)
            part = {"functionResponse": {"name": m.name, "response": _response_object(m.content)}}
            if contents and contents[-1].get("_results"):
                contents[-1]["parts"].append(part)
            else:
                contents.append({"role": "user", "parts": [part], "_results": True})
            continue
        parts: list[dict[str, Any]] = [{"text": m.content}] if m.content or not m.tool_calls else []
        parts += [{"functionCall": {"name": c.name, "args": c.arguments}} for c in m.tool_calls or []]
        contents.append({"role": VERTEX_ROLES[m.role], "parts": parts})
    for turn in contents:
        turn.pop("_results", None)
    row: dict[str, Any] = {}
    if system:
        row["systemInstruction"] = {"role": "system", "parts": [{"text": s} for s in system]}
    if example.tools:
        row["tools"] = [{"functionDeclarations": [t["function"] for t in example.tools]}]
    row["contents"] = contents
    if example.is_pair:  # preference tuning: the prompt's turns, then the two replies scored 1 and 0
        assert example.chosen is not None and example.rejected is not None
        row["completions"] = [{"score": score, "completion": {"role": "model", "parts": [{"text": reply.content}]}}
                              for score, reply in ((1, example.chosen), (0, example.rejected))]
    return row


def _response_object(content: str) -> dict[str, Any]:
    """A tool result as Gemini's ``functionResponse.response`` (an object): the JSON object the result holds, else
    ``{"content": text}``."""
    try:
        value = json.loads(content)
    except json.JSONDecodeError:
        return {"content": content}
    return value if isinstance(value, dict) else {"content": value}


def convert(example: Example, provider: str) -> dict[str, Any]:
    """Return the example as one row of ``provider``'s training file (``openai`` or ``vertex``)."""
    if provider == "openai":
        return to_openai(example)
    if provider == "vertex":
        return to_vertex(example)
    raise DataError(f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}")


def weight0_turns(example: Example) -> int:
    """Return how many assistant turns of the example have weight 0 (excluded from OpenAI's loss)."""
    return sum(1 for m in example.messages or [] if m.role == "assistant" and m.weight == 0)
