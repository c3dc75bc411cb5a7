"""Tool calling: function schemas, calls and results in conversations, and the one text form a model learns.

Data (``data.formats``) carries tools the way OpenAI does: ``Example.tools`` is a list of
``{"type": "function", "function": {"name", "description", "parameters"}}``; an assistant ``Message`` may hold
``tool_calls`` (:class:`ToolCall`: name, arguments as a JSON object, id); a ``tool`` message holds one call's result
(``tool_call_id``, ``name``).

Rendering (``data.chat``): a tokenizer whose chat template renders tools (it reads ``tools`` and ``tool_calls``) gets
them through ``apply_chat_template(messages, tools=...)``. Every other template gets this documented fallback,
written into the conversation before the template renders it, the same at training, evaluation, generation and
serving time (the Hermes / Qwen2.5 convention)::

    system:     <the system prompt, if any>\\n\\n# Tools\\n\\nYou may call one or more functions ...
                <tools>\\n{"type": "function", "function": {...}}\\n...</tools>\\n\\nFor each function call, ...
    assistant:  <text, if any>\\n<tool_call>\\n{"name": "search", "arguments": {"q": "x"}}\\n</tool_call>
    tool(s):    a user turn: <tool_response>\\n{result}\\n</tool_response> (consecutive results in one turn)

The loss covers the assistant's text and its ``<tool_call>`` blocks (they are the assistant's content); tool
results and the schemas sit in user and system turns and get none. :func:`parse_tool_calls` reads the calls back
from generated text (the tags, or a reply that is one bare ``{"name", "arguments"}`` object).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from deltatune.errors import DataError

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
SYSTEM_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
                "with function signatures within <tools></tools> XML tags:\n<tools>\n")
SYSTEM_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call>")


@dataclass
class ToolCall:
    """One function call: the function's name, its arguments as a JSON object, and the call's id."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str | None = None

    def as_json(self) -> str:
        """The call as the fallback format writes it: ``{"name": ..., "arguments": {...}}``."""
        return json.dumps({"name": self.name, "arguments": self.arguments}, ensure_ascii=False)

    def openai(self) -> dict[str, Any]:
        """The call in OpenAI's shape (``arguments`` a JSON string); an id is made up when it has none."""
        return {"id": self.id or new_call_id(), "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


def new_call_id() -> str:
    """A fresh call id in OpenAI's style (``call_`` + 24 hex digits)."""
    return "call_" + uuid.uuid4().hex[:24]


def parse_json(text: str, where: str, what: str) -> Any:
    """Parse JSON text; raises DataError naming ``where`` and ``what`` it was, with the parser's reason."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: {what} is not valid JSON ({err.msg} at column {err.colno}); fix the JSON"
                        ) from None


def _json_object(value: Any, where: str, what: str) -> dict[str, Any]:
    if isinstance(value, str):
        value = parse_json(value, where, what)
    if not isinstance(value, dict):
        raise DataError(f"{where}: {what} must be a JSON object, got {type(value).__name__}")
    return value


def normalize_tools(raw: Any, where: str) -> list[dict[str, Any]]:
    """Return function schemas in OpenAI's shape from a list (OpenAI's ``{type, function}`` items or bare
    ``{name, description, parameters}`` ones, as LLaMA-Factory writes them) or a JSON string of one."""
    if isinstance(raw, str):
        if not raw.strip():
            return []
        raw = parse_json(raw, where, "tools")
    if not isinstance(raw, list):
        raise DataError(f"{where}: tools must be a list of function schemas, got {type(raw).__name__}")
    tools = []
    for i, item in enumerate(raw):
        spec = item.get("function") if isinstance(item, dict) and item.get("type") == "function" else item
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"].strip():
            raise DataError(f"{where}: tools[{i}] must be a function schema with a name")
        params = spec.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise DataError(f"{where}: tools[{i}] ({spec['name']}): parameters must be a JSON schema object")
        tools.append({"type": "function", "function": {**spec, "parameters": params}})
    return tools


def tool_names(tools: list[dict[str, Any]] | None) -> set[str]:
    """The function names a list of schemas declares."""
    return {t["function"]["name"] for t in tools or []}


def parse_call(value: Any, where: str) -> ToolCall:
    """A call written as ``{"name", "arguments"}`` (a JSON string or an object; arguments an object or a JSON string
    of one), as ShareGPT's ``function_call`` turns hold it."""
    obj = _json_object(value, where, "the function call")
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{where}: the function call has no name")
    return ToolCall(name, _json_object(obj.get("arguments", {}), where, f"the arguments of {name}"))


def parse_openai_call(item: Any, where: str) -> ToolCall:
    """One entry of an OpenAI ``tool_calls`` list: ``{id, type: function, function: {name, arguments}}``."""
    if not isinstance(item, dict) or not isinstance(item.get("function"), dict):
        raise DataError(f"{where}: expected {{id, type: function, function: {{name, arguments}}}}")
    call = parse_call(item["function"], where)
    call.id = item.get("id") if isinstance(item.get("id"), str) else None
    return call


def system_block(tools: list[dict[str, Any]]) -> str:
    """The fallback's description of the tools, appended to the system prompt."""
    return SYSTEM_INTRO + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + SYSTEM_OUTRO


def calls_text(content: str, calls: list[ToolCall]) -> str:
    """An assistant turn with calls as the fallback writes it: its text, then one ``<tool_call>`` block per call."""
    blocks = "\n".join(f"<tool_call>\n{c.as_json()}\n</tool_call>" for c in calls)
    return f"{content.strip()}\n{blocks}" if content.strip() else blocks


def responses_text(results: list[str]) -> str:
    """Tool results as the fallback writes them: one ``<tool_response>`` block each, in one user turn."""
    return "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in results)


@dataclass
class ParsedReply:
    """Generated text read back: the text outside the calls, the calls that parse, and whether the model tried a
    call that does not parse (``malformed``)."""

    content: str
    calls: list[ToolCall]
    attempted: int
    malformed: int


def parse_tool_calls(text: str) -> ParsedReply:
    """Read the calls of a generated reply: ``<tool_call>`` blocks (an unclosed last one too), or a reply that is
    one bare ``{"name", "arguments"}`` object. Returns the rest of the text, the calls and the counts."""
    blocks = TOOL_CALL.findall(text)
    content = TOOL_CALL.sub("", text).replace("</tool_call>", "").strip()
    if not blocks and text.strip().startswith("{") and '"name"' in text:
        blocks, content = [text.strip()], ""
    calls, malformed = [], 0
    for block in blocks:
        try:
            calls.append(parse_call(block, "reply"))
        except DataError:
            malformed += 1
    return ParsedReply(content, calls, len(blocks), malformed)
