"""GGUF export of the demo delta on SmolLM2: file size, export time and quality for every --quant type.

Each exported file is read back with transformers' GGUF reader (which de-quantizes it) and measured the way the
merged float32 model is measured, in the same run: eval loss on held-out ../shared/data/alpaca_en_demo.json
examples and greedy exact match on the demo task's held-out dates. Where llama-cpp-python is installed (an
optional peer: it compiles llama.cpp), the q8_0 and f32 files also run in llama.cpp on the demo prompts: greedy
replies compared with deltatune's, and tokens/s of llama.cpp against `deltatune generate` (transformers) for one
stream. Run from the project root after `make demo` (it reads runs/demo):

    .venv/bin/python bench/export.py [--delta runs/demo] [--quants f32,f16,q8_0,...] [--examples 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from machine import cpu_name

from deltatune.data import load_examples, tokenize_examples
from deltatune.delta import load_delta, merged_model
from deltatune.evaluate import eval_loss, exact_match, reference_pairs
from deltatune.export import QUANTS, export_gguf
from deltatune.infer.generate import generate

ALPACA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpaca_en_demo.json"


def quality(model: torch.nn.Module, tokenizer: Any, alpaca: list[Any], demo: list[Any]) -> dict[str, float]:
    """Eval loss on the alpaca examples and exact match on the demo examples."""
    tokenized, _ = tokenize_examples(alpaca, tokenizer, task="causal_lm", max_length=512, truncation="drop",
                                     train_on_prompt=False, label2id=None)
    loss = eval_loss(model, tokenized, task="causal_lm", batch_size=8, mode="pack", pad_id=tokenizer.pad_token_id,
                     device=torch.device("cpu"))["eval_loss"]
    match = exact_match(model, tokenizer, demo, limit=len(demo), max_new_tokens=16)["exact_match"]
    return {"eval_loss": loss, "exact_match": match}


def llama_cpp_row(path: Path, prompts: list[list[dict[str, str]]], want: list[str],
                  lora: Path | None = None) -> dict[str, Any] | None:
    """Greedy replies of llama.cpp on ``path`` (with the adapter ``lora``), compared with ``want``; None when
    llama-cpp-python is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=512,
                n_threads=torch.get_num_threads(), verbose=False)
    replies, tokens, seconds = [], 0, 0.0
    for messages in prompts:
        started = time.perf_counter()
        out = llm.create_chat_completion(messages=messages, max_tokens=16, temperature=0.0)
        seconds += time.perf_counter() - started
        replies.append(out["choices"][0]["message"]["content"].strip())
        tokens += out["usage"]["completion_tokens"]
    same = sum(a == b for a, b in zip(replies, want, strict=True))
    return {"same_replies": same, "n": len(want), "tokens_per_s": tokens / seconds}


def main() -> None:
    """Export every quant type, measure each, print one table (and the JSON rows)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delta", default="runs/demo")
    parser.add_argument("--quants", default=",".join(QUANTS))
    parser.add_argument("--examples", type=int, default=64, help="held-out alpaca and demo examples each")
    parser.add_argument("--out", default="runs/bench-export")
    args = parser.parse_args()
    delta_dir = Path(args.delta)
    if not ALPACA.is_file():
        sys.exit(f"{ALPACA} not found: this benchmark reads the reference data beside the project")
    if not (delta_dir / "adapter_model.safetensors").is_file():
        sys.exit(f"{delta_dir}: no delta; run `make demo` first")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    alpaca = load_examples(str(ALPACA))[-args.examples:]
    demo = load_examples(str(delta_dir / "data" / "demo_eval.jsonl"))[: args.examples]
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}", flush=True)

    delta = load_delta(delta_dir, device="cpu")
    tokenizer = delta.loaded.tokenizer
    merged = merged_model(delta)
    rows = [{"variant": "merged float32 (transformers)", "bytes": None, "export_s": None,
             **quality(merged, tokenizer, alpaca, demo)}]
    prompts = [p for p, _ in reference_pairs(demo)]
    started = time.perf_counter()
    ours = [generate(merged, tokenizer, [p], max_new_tokens=16)[0].strip() for p in prompts]
    ours_s = time.perf_counter() - started
    ours_tokens = sum(len(tokenizer(r)["input_ids"]) + 1 for r in ours)  # + the end-of-turn token
    print(json.dumps(rows[-1]), flush=True)
    del merged, delta

    from transformers import AutoModelForCausalLM

    llama_rows = {}
    for quant in args.quants.split(","):
        path = out / f"demo-{quant}.gguf"
        result = export_gguf(delta_dir, path, quant=quant, force=True, say=lambda text: None)
        model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=path.name, dtype=torch.float32).eval()
        row = {"variant": quant, "bytes": result.bytes, "export_s": result.seconds,
               **quality(model, tokenizer, alpaca, demo)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
        if quant in ("q8_0", "f32"):
            found = llama_cpp_row(path, prompts, ours)
            if found is not None:
                llama_rows[quant] = found
                print(json.dumps({"llama.cpp": quant, **found}), flush=True)

    base, adapter = out / "base-f32.gguf", out / "demo-adapter.gguf"
    export_gguf(None, base, base="default", quant="f32", force=True, say=lambda text: None)
    export_gguf(delta_dir, adapter, adapter_only=True, quant="f32", force=True, say=lambda text: None)
    found = llama_cpp_row(base, prompts, ours, lora=adapter)
    if found is not None:
        llama_rows["f32 base + LoRA adapter GGUF"] = found
        print(json.dumps({"llama.cpp": "base + adapter", **found}), flush=True)

    f32 = next((r["bytes"] for r in rows if r["variant"] == "f32"), None)
    print(f"\n{args.examples} held-out alpaca examples (eval loss), {len(demo)} demo dates (exact match); "
          f"CPU: {cpu_name()}\n")
    print("| variant | file MB | x f32 | export s | eval loss | exact match |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        size = f"{r['bytes'] / 1e6:.1f}" if r["bytes"] else "-"
        ratio = f"{r['bytes'] / f32:.3f}" if r["bytes"] and f32 else "-"
        secs = f"{r['export_s']:.1f}" if r["export_s"] is not None else "-"
        print(f"| {r['variant']} | {size} | {ratio} | {secs} | {r['eval_loss']:.4f} | {r['exact_match']:.1%} |")
    print(f"\ndeltatune generate (transformers, merged float32): {ours_tokens / ours_s:.1f} tokens/s for one stream")
    for quant, r in llama_rows.items():
        print(f"llama.cpp {quant}: {r['tokens_per_s']:.1f} tokens/s; greedy replies identical to deltatune's for "
              f"{r['same_replies']} of {r['n']} prompts")
    if not llama_rows:
        print("llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python compiles it); skipped")


if __name__ == "__main__":
    main()
