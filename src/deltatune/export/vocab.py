"""The tokenizer as GGUF metadata: tokens, token types, merges or scores, special ids, ``add_bos``, chat template.

Two tokenizer kinds are written, the two llama.cpp's Llama family uses:

- byte-level BPE (``tokenizer.ggml.model = gpt2``: SmolLM, Llama 3, Qwen2): the vocabulary in its byte-level
  spelling, the merges, and the pre-tokenizer's name (``tokenizer.ggml.pre``), which tells llama.cpp how text is
  split before BPE. The name is read off the tokenizer's own pre-tokenizer, so llama.cpp splits text the way
  the tokenizer deltatune trained with does.
- SentencePiece-style BPE with byte fallback (``llama``: Llama 2, Mistral): tokens with their scores, from the
  ``gguf`` package's reader of such tokenizers.

Added tokens that are special (``<|im_start|>``) are ``CONTROL`` tokens, other added tokens ``USER_DEFINED``;
rows of the embedding beyond the tokenizer (padding for speed) get unused ``[PAD<id>]`` tokens.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import gguf

from deltatune.errors import DeltatuneError

# pre-tokenizer split patterns, as the tokenizers' own tokenizer.json files spell them -> llama.cpp's names
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """Return llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer (``gpt-2``, ``smollm``,
    ``llama-bpe``, ``qwen2``); raise DeltatuneError for one llama.cpp would split differently."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    splits = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    byte_level_regex = any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts)
    digits = any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts)
    if not splits and byte_level_regex and set(kinds) <= {"ByteLevel", "Digits"}:
        return "smollm" if digits else "gpt-2"
    if len(splits) == 1 and splits[0] in SPLIT_NAMES and not byte_level_regex:
        return SPLIT_NAMES[splits[0]]
    raise DeltatuneError(f"export: the tokenizer's pre-tokenizer ({json.dumps(pre)[:160]}) has no llama.cpp "
                         "equivalent deltatune knows (GPT-2, SmolLM, Llama 3 and Qwen2 byte-level BPE; "
                         "SentencePiece-style Llama/Mistral)")


def write_vocab(writer: gguf.GGUFWriter, tokenizer: Any, n_vocab: int) -> None:
    """Add ``tokenizer`` (a transformers fast tokenizer) to ``writer`` for a model with ``n_vocab`` embedding
    rows: the tokenizer model and its tokens, merges or scores, special ids, add_bos/add_eos, chat template."""
    with tempfile.TemporaryDirectory(prefix="deltatune-vocab-") as tmp:
        tokenizer.save_pretrained(tmp)  # tokenizer.json, whatever the tokenizer was loaded from
        folder = Path(tmp)
        if not (folder / "tokenizer.json").is_file():
            raise DeltatuneError("export: the tokenizer has no fast (tokenizer.json) form; deltatune exports fast "
                                 "tokenizers only")
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        model = data.get("model", {})
        if model.get("type") == "BPE" and model.get("byte_fallback"):
            _write_sentencepiece_bpe(writer, folder, n_vocab)
        elif model.get("type") == "BPE":
            _write_byte_level_bpe(writer, data, tokenizer, n_vocab)
        else:
            raise DeltatuneError(f"export: a {model.get('type')} tokenizer cannot be written as GGUF by deltatune "
                                 "(byte-level BPE and SentencePiece-style BPE can)")
        special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=n_vocab)
        special.chat_template = None  # these three are written below, from what the tokenizer itself does
        special.add_special_token = {}
        special.add_to_gguf(writer, quiet=True)
    writer.add_add_bos_token(_adds(tokenizer, tokenizer.bos_token_id, first=True))
    writer.add_add_eos_token(_adds(tokenizer, tokenizer.eos_token_id, first=False))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _write_byte_level_bpe(writer: gguf.GGUFWriter, data: dict[str, Any], tokenizer: Any, n_vocab: int) -> None:
    vocab: dict[str, int] = data["model"]["vocab"]
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    by_id = {i: text for text, i in vocab.items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    size = max(n_vocab, max(by_id) + 1)
    if size > n_vocab:
        raise DeltatuneError(f"export: the tokenizer has ids up to {size - 1} but the model only {n_vocab} "
                             "embedding rows")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(data))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)


def _write_sentencepiece_bpe(writer: gguf.GGUFWriter, folder: Path, n_vocab: int) -> None:
    vocab = gguf.LlamaHfVocab(folder)
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens[:n_vocab])
    writer.add_token_scores(scores[:n_vocab])
    writer.add_token_types(types[:n_vocab])


def _adds(tokenizer: Any, token_id: int | None, *, first: bool) -> bool:
    """Whether encoding text puts ``token_id`` first (bos) or last (eos), as the tokenizer does it."""
    if token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and (ids[0] if first else ids[-1]) == token_id
