"""Shared fixtures: tiny random-initialised models built from a config, the bundled tokenizer, real data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# train.precision: auto means bf16-mixed on CPUs with bf16 units; the suite compares results exactly against
# float32 references, so auto is float32 here (tests of the other precisions ask for them by name)
os.environ.setdefault("DELTATUNE_AUTO_PRECISION", "fp32")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(name: str) -> Path:
    """Return a file of ../shared/data, or skip the test where the checkout has no ../shared."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present (the reference data lives beside the project, not in a user's clone)")
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct, converted once to a safetensors folder (cached)."""
    from deltatune.models import resolve_source

    try:
        return Path(resolve_source("default"))
    except Exception as err:  # the bundled package is missing
        pytest.skip(f"bundled SmolLM2 not available: {err}")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template, saved as a model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=2, bos_token_id=1, eos_token_id=2,
                         initializer_range=0.2)  # large enough that a frozen tied head can express a task
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    for f in smollm2_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random BERT with the bundled MiniLM tokenizer, saved as a model folder."""
    from transformers import BertConfig, BertModel

    from deltatune.models import minilm_path

    try:
        src = minilm_path()
    except Exception as err:
        pytest.skip(f"bundled MiniLM not available: {err}")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=128)
    out = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(autouse=True)
def _threads(request: pytest.FixtureRequest):
    """Tiny models run fastest on one thread (and do not fight over the cores); real models use all."""
    before = torch.get_num_threads()
    torch.set_num_threads(before if request.node.get_closest_marker("slow") else 1)
    yield
    torch.set_num_threads(before)
