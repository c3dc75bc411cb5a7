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

A tokenizer without a chat template gets a plain built-in one::

    ### System:\\n{content}\\n\\n### User:\\n{content}\\n\\n### Assistant:\\n{content}{eos}\\n\\n
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deltatune.data.formats import Message
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


def fallback_render(messages: list[dict[str, str]], add_generation_prompt: bool, eos: str) -> str:
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
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.eos = tokenizer.eos_token or ""

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool, origin: str) -> str:
        """Return the conversation as text; raises DataError if the template rejects it."""
        if not self.has_template:
            return fallback_render(messages, add_generation_prompt, self.eos)
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as err:  # jinja's raise_exception and TemplateError: the template says why
            raise DataError(f"{origin}: the model's chat template rejects this conversation ({err}); "
                            "fix the roles/order of the messages") from None
        if not isinstance(text, str):
            raise DataError(f"{origin}: the chat template did not return text (got {type(text).__name__})")
        return text

    def render_with_spans(self, messages: list[Message], origin: str, *,
                          train_on_prompt: bool = False) -> RenderedChat:
        """Render the whole conversation and locate the supervised character spans.

        Returns the text and, unless ``train_on_prompt`` (one span over everything), one span per
        assistant message whose weight is not 0.
        """
        plain = [{"role": m.role, "content": m.content} for m in messages]
        full = self.render(plain, False, origin)
        if train_on_prompt:
            return RenderedChat(full, [Span(0, len(full))])
        spans: list[Span] = []
        cursor = 0
        for i, message in enumerate(messages):
            if message.role != "assistant":
                continue
            span = self._prefix_span(plain, i, full, origin)
            if span is None or span.start < cursor:
                span = self._search_span(full, message.content, cursor, origin, i)
            cursor = span.end
            if message.weight != 0:
                spans.append(span)
        return RenderedChat(full, spans)

    def _prefix_span(self, plain: list[dict[str, str]], i: int, full: str, origin: str) -> Span | None:
        """The span of message i from prefix renders, or None if the template is not prefix-stable."""
        try:
            before = self.render(plain[:i], True, origin)
            upto = self.render(plain[: i + 1], False, origin)
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
