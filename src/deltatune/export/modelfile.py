"""An Ollama ``Modelfile`` that chats in the prompt format the model was trained with.

    fmt = chat_format(tokenizer)                    # ChatML, Llama 3 or Mistral [INST], read off the template
    text = modelfile("model.gguf", fmt, system="You answer in ISO 8601.")

Ollama writes prompts with Go templates, not Jinja, so the tokenizer's chat template is not copied: it is
rendered on a probe conversation, recognised as one of the formats below, and that format's Go template is
written, with its stop tokens. A template that adds a default system prompt when none is given (SmolLM2's does)
gets it as the ``SYSTEM`` line, unless the run had its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deltatune.errors import DeltatuneError

HEADER = "# Modelfile written by deltatune: `ollama create NAME -f Modelfile`\n"


@dataclass(frozen=True)
class ChatFormat:
    """A chat prompt format: how each role's turn is wrapped, and the Go template and stops Ollama needs."""

    name: str
    system: tuple[str, str]  # text before and after the system prompt
    user: tuple[str, str]
    assistant: tuple[str, str]  # the assistant's prefix is also the generation prompt
    stops: tuple[str, ...]

    def render(self, system: str | None, turns: list[tuple[str, str]], generation_prompt: bool) -> str:
        """Return the prompt this format makes of ``system`` and (role, content) ``turns``."""
        text = f"{self.system[0]}{system}{self.system[1]}" if system is not None else ""
        for role, content in turns:
            before, after = self.user if role == "user" else self.assistant
            text += f"{before}{content}{after}"
        return text + (self.assistant[0] if generation_prompt else "")

    def go_template(self) -> str:
        """Return the format as an Ollama Go template (system from ``.System``, turns from ``.Messages``). No
        ``{{-`` trim markers: the turns' own newlines are part of the format."""
        def go(text: str) -> str:
            return text.replace("{{", '{{ "{{" }}')

        return ("{{ if .System }}" + go(self.system[0]) + "{{ .System }}" + go(self.system[1]) + "{{ end }}"
                "{{ range .Messages }}"
                '{{ if eq .Role "user" }}' + go(self.user[0]) + "{{ .Content }}" + go(self.user[1]) +
                '{{ else if eq .Role "assistant" }}' + go(self.assistant[0]) + "{{ .Content }}" +
                go(self.assistant[1]) + "{{ end }}{{ end }}" + go(self.assistant[0]))


FORMATS = (
    ChatFormat("chatml", ("<|im_start|>system\n", "<|im_end|>\n"), ("<|im_start|>user\n", "<|im_end|>\n"),
               ("<|im_start|>assistant\n", "<|im_end|>\n"), ("<|im_start|>", "<|im_end|>")),
    ChatFormat("llama3", ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
               ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
               ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    ChatFormat("mistral", ("", "\n\n"), ("[INST] ", " [/INST]"), ("", "</s>"), ("[INST]", "[/INST]", "</s>")),
)
_PROBE = [("user", "Hello there"), ("assistant", "Hi, how can I help?"), ("user", "Name a colour")]


def chat_format(tokenizer: Any) -> tuple[ChatFormat, str | None]:
    """Return the tokenizer's chat format and the default system prompt its template adds (or None).

    Raises DeltatuneError when the tokenizer has no chat template or one no known format reproduces.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DeltatuneError("export --ollama: the tokenizer has no chat template, so there is no prompt format to "
                             "give Ollama; export without --ollama")
    messages = [{"role": r, "content": c} for r, c in _PROBE]
    with_system = _render(tokenizer, [{"role": "system", "content": "Be brief."}, *messages])
    plain = _render(tokenizer, messages)
    bos = tokenizer.bos_token or ""
    for fmt in FORMATS:
        for prefix in ("", bos):
            if with_system != prefix + fmt.render("Be brief.", _PROBE, True):
                continue
            if plain == prefix + fmt.render(None, _PROBE, True):
                return fmt, None
            default = _default_system(plain.removeprefix(prefix), fmt)
            if default is not None:
                return fmt, default
    raise DeltatuneError("export --ollama: the model's chat template is none of the formats deltatune writes "
                         f"Ollama templates for ({', '.join(f.name for f in FORMATS)}); export without --ollama "
                         "and write the Modelfile's TEMPLATE by hand")


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _default_system(plain: str, fmt: ChatFormat) -> str | None:
    """The system prompt a template adds by itself, when ``plain`` is this format with some system prompt."""
    before, after = fmt.system
    rest = fmt.render(None, _PROBE, True)
    if not (before and plain.startswith(before) and plain.endswith(rest)):
        return None
    inner = plain[len(before):len(plain) - len(rest)]
    return inner[: -len(after)] if after and inner.endswith(after) else None


def modelfile(source: str, fmt: ChatFormat, *, system: str | None, adapter: str | None = None) -> str:
    """Return the Modelfile text: ``FROM source`` (and ``ADAPTER adapter``), the template, the stops, the system
    prompt."""
    lines = [HEADER.rstrip("\n"), f"FROM {source}"]
    if adapter is not None:
        lines.append(f"ADAPTER {adapter}")
    lines.append(f'TEMPLATE """{fmt.go_template()}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in fmt.stops]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"

