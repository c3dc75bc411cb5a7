"""Quantized deltas end to end: `deltatune merge` de-quantizes and folds into a plain model folder that
transformers loads alone; `deltatune train ... method.name=qlora` through the real CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import deltatune as dt
from deltatune.cli import main
from deltatune.config import ModelConfig
from deltatune.methods import trainable_parameters

pytest.importorskip("bitsandbytes")

IDS = torch.tensor([[1, 17, 250, 3000, 42, 9, 77, 5], [1, 8, 99, 1000, 7, 6, 300, 2]])


def write_chat_data(path: Path, n: int = 24) -> Path:
    """A tiny chat task: name the colour of a thing."""
    colours = {"apple": "red", "lime": "green", "sky": "blue", "coal": "black"}
    things = list(colours)
    rows = [{"messages": [{"role": "user", "content": f"What colour is {things[i % 4]} number {i}?"},
                          {"role": "assistant", "content": colours[things[i % 4]]}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trained_delta(base: Path, quant: str, method: dict, out: Path) -> Path:
    """Attach ``method`` to the ``quant`` base, move its parameters off their init, save the delta."""
    loaded = dt.load_model(ModelConfig(name=str(base), device="cpu", quantize=quant), task="causal_lm")
    attached = dt.attach(loaded.model, method)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable_parameters(loaded.model).values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return dt.save_delta(out, attached, loaded.model, loaded.source, task="causal_lm")


@pytest.mark.parametrize(("quant", "method", "dtype"), [
    ("nf4", {"name": "lora", "r": 4}, "float32"),
    ("nf4", {"name": "lora", "r": 4, "use_dora": True}, "bfloat16"),
    ("int8", {"name": "ia3"}, "float32"),
], ids=["nf4-lora", "nf4-dora-bf16", "int8-ia3"])
def test_merge_writes_a_plain_model_close_to_the_quantized_one(quant: str, method: dict, dtype: str,
                                                               tiny_llama_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM

    delta_dir = trained_delta(tiny_llama_dir, quant, method, tmp_path / "delta")
    unmerged = dt.load_delta(delta_dir, device="cpu")
    with torch.no_grad():
        want = unmerged.loaded.model(input_ids=IDS).logits
    assert main(["merge", str(delta_dir), str(tmp_path / "merged"), "--dtype", dtype]) == 0
    printed = capsys.readouterr().out
    assert "de-quantized" in printed and f"the {quant}{'+dq' if quant == 'nf4' else ''} base + delta" in printed
    merged_dir = tmp_path / "merged"
    config = json.loads((merged_dir / "config.json").read_text())
    assert "quantization_config" not in config
    with safe_open(str(merged_dir / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert all(f.get_tensor(k).dtype == getattr(torch, dtype) for k in keys)
    assert not [k for k in keys if re.search(r"absmax|quant|SCB|lora|ia3", k)]
    plain = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        got = plain(input_ids=IDS).logits
    distance = float((got - want).abs().max())
    print(f"{quant} {method['name']} merged ({dtype}) vs unmerged quantized: max |dlogit| {distance:.2e}")
    scale = float(want.abs().max())
    # 4-bit: the merged weights are exactly the de-quantized ones, so only float rounding (or bf16) is left;
    # int8 computes its activations in 8 bits too, so the merged float model differs by that rounding
    limit = {"float32": 1e-3, "bfloat16": 0.05}[dtype] * scale if quant == "nf4" else 0.1 * scale
    assert distance < limit, (distance, scale)


def test_cli_trains_qlora_and_the_delta_reloads_quantized(tiny_llama_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = write_chat_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    assert main(["train", f"model.name={tiny_llama_dir}", f"data.train={data}", f"output.dir={out}",
                 "method.name=qlora", "method.r=4", "train.max_steps=3", "train.batch_size=4", "train.lr=1e-2",
                 "data.eval=0.25", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "paging needs CUDA" in printed and "running adamw_8bit" in printed
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and "deltatune" not in adapter_config  # pure peft format
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["deltatune"])
    assert meta["method"]["name"] == "qlora"
    assert meta["quantization"] == {"quantize": "nf4", "double_quant": True, "compute_dtype": "float32"}
    run = (out / "run.yaml").read_text()
    assert "quantize: nf4" in run and "optimizer: paged_adamw_8bit" in run
    assert main(["eval", str(out), "--data", str(data)]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["examples"] == 24 and figures["eval_loss"] > 0
