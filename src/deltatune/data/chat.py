"""Render a conversation with the tokenizer's chat template and find the characters to train on.

The loss goes on each assistant message's content and the end-of-turn text the template writes right
after it (``<|im_end|>`` in ChatML, ``<|eot_id|>`` in Llama 3, ``</s>`` in Llama 2), never on the
assistant header (``<|im_start|>assistant\\n``) or the prompt. The spans are found without knowing the
template: for assistant message i,

    before = render(messages[:i], add_generation_prompt=True)   # ... ends with the assistant header
    upto   = render(messages[:i + 1])                           # ... ends after message i's end-of-turn
    span   = upto[len(before):] without its trailing whitespace  # content + end-of-turn

which holds when each render is a prefix of the next one (true of ChatML, Llama 2/3, Mistral, Gemma, Phi).
A template that rewrites earlier turns (so the renders are not prefixes) falls back to locating the
content in the full render; the end-of-turn is then the special tokens right after the content.

Conversations with tools (``data.tools``) go through the template's own tool rendering when it has one, else
through deltatune's documented fallback (calls as ``<tool_call>`` text in the assistant turn, results as a user
turn of ``<tool_response>`` blocks, the schemas in the system prompt): :meth:`ChatRenderer.template_messages`.

A tokenizer without a chat template gets a plain built-in one::

    ### System:\\n{content}\\n\\n### User:\\n{content}\\n\\n### Assistant:\\n{content}{eos}\\n\\n
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deltatune.data.formats import Message
from deltatune.data.tools import calls_text, responses_text, system_block
from deltatune.errors import DataError


@dataclass
class Span:
    """Characters ``[start, end)`` of the rendered text that get the loss.

    ``extend_special``: also supervise the special tokens right after the span (the fallback's end-of-turn).
    """

    start: int
    end: int
    extend_special: bool = False


@dataclass
class RenderedChat:
    """A conversation rendered to text, with the character spans that carry the loss."""

    text: str
    spans: list[Span] = field(default_factory=list)


def fallback_render(messages: list[dict[str, Any]], add_generation_prompt: bool, eos: str) -> str:
    """Render with the built-in ``### Role:`` template (for tokenizers without a chat template)."""
    parts = [f"### {m['role'].capitalize()}:\n{m['content']}{eos if m['role'] == 'assistant' else ''}\n\n"
             for m in messages]
    if add_generation_prompt:
        parts.append("### Assistant:\n")
    return "".join(parts)


class ChatRenderer:
    """Renders conversations for one tokenizer, with its chat template or the built-in fallback."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        template = getattr(tokenizer, "chat_template", None)
        self.has_template = bool(template)
        # a template that reads both the schemas and the calls renders tools itself (Qwen2.5, Llama 3.1, Hermes...)
        self.native_tools = isinstance(template, str) and "tools" in template and "tool_calls" in template
        self.eos = tokenizer.eos_token or ""

    def template_messages(self, messages: list[Message], tools: list[dict[str, Any]] | None = None
                          ) -> tuple[list[dict[str, Any]], list[int]]:
        """Return the conversation as the chat template takes it, and for each message its index there (a tool
        result merged into the user turn before it shares that turn's index). Calls and results take the
        template's own fields when it renders tools, else the fallback's text (module docstring)."""
        plain: list[dict[str, Any]] = []
        where: list[int] = []
        native = self.native_tools and self.has_template
        for m in messages:
            if native:
                item: dict[str, Any] = {"role": m.role, "content": m.content}
                if m.tool_calls:
                    item["tool_calls"] = [{"type": "function", "id": c.id,
                                           "function": {"name": c.name, "arguments": c.arguments}}
                                          for c in m.tool_calls]
                if m.role == "tool":
                    item.update({"name": m.name, "tool_call_id": m.tool_call_id})
                plain.append(item)
            elif m.role == "tool":
                if plain and plain[-1].get("_results") is not None:  # consecutive results: one user turn
                    plain[-1]["_results"].append(m.content)
                    plain[-1]["content"] = responses_text(plain[-1]["_results"])
                else:
                    plain.append({"role": "user", "content": responses_text([m.content]), "_results": [m.content]})
            else:
                content = calls_text(m.content, m.tool_calls) if m.tool_calls else m.content
                plain.append({"role": m.role, "content": content})
            where.append(len(plain) - 1)
        if tools and not native:
            if plain and plain[0]["role"] == "system":
                plain[0] = {"role": "system", "content": plain[0]["content"].rstrip() + "\n\n" + system_block(tools)}
            else:
                plain.insert(0, {"role": "system", "content": system_block(tools)})
                where = [w + 1 for w in where]
        for item in plain:
            item.pop("_results", None)
        return plain, where

    def prompt(self, messages: list[Message], tools: list[dict[str, Any]] | None = None, origin: str = "prompt"
               ) -> str:
        """Return the text that asks for the next assistant turn of ``messages`` (tools rendered as in training)."""
        plain, _ = self.template_messages(messages, tools)
        return self.render(plain, True, origin, tools)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool, origin: str,
               tools: list[dict[str, Any]] | None = None) -> str:
        """Return the conversation as text (``tools`` passed on to a template that renders them); raises DataError
        if the template rejects it."""
        if not self.has_template:
            return fallback_render(messages, add_generation_prompt, self.eos)
        extra = {"tools": tools} if tools and self.native_tools else {}
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)
        except Exception as err:  # jinja's raise_exception and TemplateError: the template says why
            raise DataError(f"{origin}: the model's chat template rejects this conversation ({err}); "
                            "fix the roles/order of the messages") from None
        if not isinstance(text, str):
            raise DataError(f"{origin}: the chat template did not return text (got {type(text).__name__})")
        return text

    def render_with_spans(self, messages: list[Message], origin: str, *, train_on_prompt: bool = False,
                          tools: list[dict[str, Any]] | None = None) -> RenderedChat:
        """Render the whole conversation and locate the supervised character spans.

        Returns the text and, unless ``train_on_prompt`` (one span over everything), one span per
        assistant message whose weight is not 0 (its text and its tool calls).
        """
        plain, where = self.template_messages(messages, tools)
        full = self.render(plain, False, origin, tools)
        if train_on_prompt:
            return RenderedChat(full, [Span(0, len(full))])
        spans: list[Span] = []
        cursor = 0
        for i, message in enumerate(messages):
            if message.role != "assistant":
                continue
            span = self._prefix_span(plain, where[i], full, origin, tools)
            if span is None or span.start < cursor:
                span = self._search_span(full, plain[where[i]]["content"], cursor, origin, i)
            cursor = span.end
            if message.weight != 0:
                spans.append(span)
        return RenderedChat(full, spans)

    def _prefix_span(self, plain: list[dict[str, Any]], i: int, full: str, origin: str,
                     tools: list[dict[str, Any]] | None = None) -> Span | None:
        """The span of message i from prefix renders, or None if the template is not prefix-stable."""
        try:
            before = self.render(plain[:i], True, origin, tools)
            upto = self.render(plain[: i + 1], False, origin, tools)
        except DataError:  # a template that refuses partial conversations
            return None
        if not upto.startswith(before) or not full.startswith(upto):
            return None
        segment = upto[len(before):]
        content = plain[i]["content"]
        offset = segment.find(content)
        if offset < 0:  # a template that trims the content
            offset = segment.find(content.strip())
        if offset < 0:
            return None
        end = len(before) + len(segment.rstrip())
        start = len(before) + offset
        return Span(start, end) if end > start else None

    @staticmethod
    def _search_span(full: str, content: str, cursor: int, origin: str, i: int) -> Span:
        """Fallback: find the content itself after ``cursor``; its end-of-turn is left to the tokens."""
        for needle in (content, content.strip()):
            at = full.find(needle, cursor)
            if at >= 0 and needle:
                return Span(at, at + len(needle), extend_special=True)
        raise DataError(f"{origin}: cannot find assistant message {i} in the chat template's output (the "
                        "template changes the text); set data.train_on_prompt=true or use another template")
