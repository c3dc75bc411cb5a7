"""Generation prompts match what the model was trained on, also for tokenizers without a chat template."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from deltatune.data.chat import fallback_render
from deltatune.infer.generate import render_prompt


def test_prompt_without_chat_template_is_the_training_render_prefix(tiny_llama_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = None
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
               {"role": "user", "content": "Colour of snow?"}]
    prompt = render_prompt(tok, history)
    trained = fallback_render([*history, {"role": "assistant", "content": "white"}], False, tok.eos_token)
    assert trained.startswith(prompt) and trained[len(prompt):].startswith("white")
    assert f"Hello{tok.eos_token}" in prompt  # earlier assistant turns end as they did in training
