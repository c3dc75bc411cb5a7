"""Generation prompts match what the model was trained on, also for tokenizers without a chat template."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import patch

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltatune.data.chat import fallback_render
from deltatune.infer.generate import generate, render_prompt


def test_prompt_without_chat_template_is_the_training_render_prefix(tiny_llama_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = None
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
               {"role": "user", "content": "Colour of snow?"}]
    prompt = render_prompt(tok, history)
    trained = fallback_render([*history, {"role": "assistant", "content": "white"}], False, tok.eos_token)
    assert trained.startswith(prompt) and trained[len(prompt):].startswith("white")
    assert f"Hello{tok.eos_token}" in prompt  # earlier assistant turns end as they did in training


def test_bf16_prompts_are_padded_to_64_tokens_and_replies_do_not_change(tiny_llama_dir: Path) -> None:
    """In bf16 a batch's prompts are left-padded to a multiple of 64 tokens (the kernels keep compiled code per
    length; ``precision.SHAPE_STEP``), masked: the replies are those of the batch padded to its longest prompt; in
    float32 nothing is added."""
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = ["Colour of snow?", "Name a large animal that lives in the sea, please."]
    lengths: list[int] = []

    def record(_module: object, _args: object, kwargs: dict) -> None:
        lengths.append(kwargs["input_ids"].shape[1])

    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype)
        model.register_forward_pre_hook(record, with_kwargs=True)
        lengths.clear()
        got = generate(model, tok, prompts, max_new_tokens=6)
        prefill = lengths[0]
        assert (prefill % 64 == 0) == (dtype == torch.bfloat16), (dtype, prefill)
        with patch("deltatune.infer.generate.shape_step", return_value=1):  # padded to the longest prompt only
            want = generate(model, tok, prompts, max_new_tokens=6)
        assert got == want, dtype
