"""Generate replies with a chat model: prompts rendered with its chat template, batched, greedy by default."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.compute.precision import shape_step
from deltatune.data.chat import ChatRenderer
from deltatune.data.formats import Message, parse_messages

Prompt = list[dict[str, Any]] | list[Message]


def render_prompt(tokenizer: Any, messages: Prompt, tools: list[dict[str, Any]] | None = None) -> str:
    """Return the chat-template text for ``messages`` (Messages, or OpenAI-style dicts, tool calls and results
    included) followed by the assistant header, with ``tools`` rendered exactly as in training."""
    parsed = [m for m in messages if isinstance(m, Message)]
    if len(parsed) != len(messages):
        parsed = parse_messages(list(messages), tools)
    return ChatRenderer(tokenizer).prompt(parsed, tools)


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[Prompt] | list[str],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    tools: list[list[dict[str, Any]] | None] | None = None,
) -> list[str]:
    """Return the reply to each prompt (a user string or a list of chat messages), without the prompt.

    Prompts are left-padded in batches; ``temperature`` 0 means greedy decoding. ``tools``: each prompt's function
    schemas (rendered as in training; parse the replies with ``data.tools.parse_tool_calls``). On a CPU in bf16/fp16
    (the weights, or under autocast) a batch is left-padded to a multiple of ``precision.shape_step`` tokens: its
    kernels keep compiled code for every prompt length they meet, so an evaluation over many prompts would grow with
    each new length. The padding is masked: the replies are the unpadded batch's, up to bf16 rounding.
    """
    device = next(model.parameters()).device
    step = shape_step(device, *{p.dtype for p in model.parameters()})
    texts = [render_prompt(tokenizer, [{"role": "user", "content": p}] if isinstance(p, str) else p,
                           tools[k] if tools else None) for k, p in enumerate(prompts)]
    replies: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              pad_to_multiple_of=step if step > 1 else None, add_special_tokens=False).to(device)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 \
                else {"do_sample": False}
            out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 **sampling)
            new = out[:, batch["input_ids"].shape[1]:]
            replies += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies
