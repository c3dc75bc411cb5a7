"""`deltatune export`: GGUF files checked by readers deltatune did not write — transformers' GGUF loader (logits and
tokenizer) and the gguf package's GGUFReader (metadata, tensor types and shapes, llama.cpp's adapter format)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from deltatune.cli import main
from deltatune.delta import load_delta, merged_model
from deltatune.errors import DeltatuneError
from deltatune.export import export_gguf
from deltatune.export.arch import interleave_rope_rows
from deltatune.export.modelfile import HEADER
from tests.test_train import train_args, write_chat_data

TEXTS = ["Hello world", "What colour is sky number 42?", "  spaces\tand\nnew lines ", "héllo wörld — ünïcode 😀",
         "<|im_start|>user\nhi<|im_end|>", "1999-12-31 12:00", ""]


def quiet(text: str) -> None:
    return None


@pytest.fixture(scope="module")
def lora_delta(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA delta on the tiny Llama with clearly non-zero B (a few steps at a high rate), r 4, alpha 16."""
    root = tmp_path_factory.mktemp("export")
    data = write_chat_data(root / "d.jsonl", n=16)
    out = root / "lora"
    assert main(train_args(tiny_llama_dir, data, out, "train.max_steps=4", "train.lr=2e-2", "data.eval=null",
                           "method.alpha=16", "data.system_prompt=Answer with one word.")) == 0
    return out


def gguf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the model transformers reads back from a GGUF file (it de-quantizes)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=ids).logits


def merged_logits(delta: Path, ids: torch.Tensor) -> torch.Tensor:
    model = merged_model(load_delta(delta, device="cpu"))
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 33, 900, 4093, 2, 216, 40000, 17, 5]])


def test_a_merged_f32_export_reads_back_with_the_merged_models_logits_and_tokenizer(lora_delta: Path,
                                                                                    tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "model.gguf"
    result = export_gguf(lora_delta, out, quant="f32", say=quiet)
    assert result.kinds == {"F32": result.tensors} and out.stat().st_size == result.bytes
    want = merged_logits(lora_delta, IDS)
    got = gguf_logits(out, IDS)
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())
    # and the delta matters: the base alone differs
    base = gguf_logits(_export_base(lora_delta, tmp_path), IDS)
    assert float((base - want).abs().max()) > 1e-2
    original = load_delta(lora_delta, device="cpu").loaded.tokenizer
    read = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    for text in TEXTS:
        assert read(text)["input_ids"] == original(text)["input_ids"], text
    chat = [{"role": "user", "content": "What colour is coal?"}, {"role": "assistant", "content": "black"}]
    assert read.apply_chat_template(chat, tokenize=False) == original.apply_chat_template(chat, tokenize=False)


def _export_base(delta: Path, tmp_path: Path) -> Path:
    base = json.loads((delta / "adapter_config.json").read_text())["base_model_name_or_path"]
    out = tmp_path / "base.gguf"
    export_gguf(None, out, base=base, quant="f32", say=quiet)
    return out


@pytest.mark.parametrize(("quant", "bound"), [("f16", 0.01), ("bf16", 0.1), ("q8_0", 0.25)])
def test_f16_bf16_and_q8_0_exports_read_back_close_to_the_merged_model(quant: str, bound: float, lora_delta: Path,
                                                                        tmp_path: Path) -> None:
    out = tmp_path / f"model-{quant}.gguf"
    assert main(["export", str(lora_delta), "-o", str(out), "--quant", quant]) == 0
    want = merged_logits(lora_delta, IDS)
    # relative to the logits' spread: a 2-layer random model with large weights amplifies rounding
    gap = float((gguf_logits(out, IDS) - want).abs().max() / want.std())
    assert 0 < gap < bound, gap


@pytest.mark.parametrize(("quant", "bound"), [("bf16", 0.005), ("q8_0", 0.01), ("q5_1", 0.04), ("q5_0", 0.05),
                                              ("q4_1", 0.08), ("q4_0", 0.1)])
def test_every_tensor_decodes_to_the_merged_weight_in_its_type(quant: str, bound: float, lora_delta: Path,
                                                               tmp_path: Path) -> None:
    from deltatune.export.arch import arch_spec

    out = tmp_path / f"model-{quant}.gguf"
    export_gguf(lora_delta, out, quant=quant, say=quiet)
    model = merged_model(load_delta(lora_delta, device="cpu"))
    spec = arch_spec(model)
    weights = {spec.gguf_name(n): spec.gguf_layout(n, t).numpy() for n, t in model.state_dict().items()
               if n != "lm_head.weight"}
    reader = gguf.GGUFReader(str(out))
    kind = getattr(gguf.GGMLQuantizationType, quant.upper())
    assert {t.name for t in reader.tensors} == set(weights)
    for t in reader.tensors:
        want = weights[t.name]
        # 1-D tensors stay f32; every matrix here is 64 or 128 wide, so whole blocks: the chosen type
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if want.ndim == 1 else kind), t.name
        got = dequantize(np.array(t.data), t.tensor_type).reshape(want.shape)
        error = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert error < (1e-7 if want.ndim == 1 else bound), (t.name, error)
    assert _field(reader, "general.file_type") == getattr(gguf.LlamaFileType, f"MOSTLY_{quant.upper()}")


def _field(reader: gguf.GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


def test_the_metadata_and_every_tensor_shape_match_llama_cpps_names(lora_delta: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    export_gguf(lora_delta, out, quant="q8_0", say=quiet)
    reader = gguf.GGUFReader(str(out))
    f = {k: reader.fields[k].contents() for k in reader.fields if not k.startswith("tokenizer.ggml.")}
    assert f["general.architecture"] == "llama" and f["general.type"] == "model"
    assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.feed_forward_length"]) == (2, 64, 128)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (4, 2)
    assert f["llama.rope.dimension_count"] == 16 and f["llama.context_length"] == 512
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 49152
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == 2
    assert "<|im_start|>" in reader.fields["tokenizer.chat_template"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[1] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL
    shapes = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type) for t in reader.tensors}
    assert "output.weight" not in shapes  # tied: llama.cpp uses token_embd
    assert shapes["token_embd.weight"][0] == (64, 49152)  # GGUF lists dimensions innermost first
    assert shapes["blk.1.attn_k.weight"][0] == (64, 32) and shapes["blk.0.ffn_down.weight"][0] == (128, 64)
    assert shapes["output_norm.weight"] == ((64,), gguf.GGMLQuantizationType.F32)
    assert len(shapes) == 2 + 2 * 9


def test_qwen2_and_mistral_read_back_with_the_same_logits(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = {"vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
             "initializer_range": 0.2}
    for name, cls, cfg in (("qwen2", Qwen2ForCausalLM, Qwen2Config(**shape, tie_word_embeddings=False)),
                           ("mistral", MistralForCausalLM, MistralConfig(**shape, tie_word_embeddings=False))):
        torch.manual_seed(1)
        model = cls(cfg)
        if name == "qwen2":  # its q/k/v biases are zero at init: make them matter
            with torch.no_grad():
                for layer in model.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(0, 0.5)
        # (not named "mistral": transformers' GGUF reader takes a general.name holding "mistral" for a model type
        # the gguf package lacks)
        folder = tmp_path / f"tiny-{name[:3]}"
        model.save_pretrained(folder)
        for f in tiny_llama_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(f, folder / f.name)
        out = tmp_path / f"{name}.gguf"
        export_gguf(None, out, base=str(folder), quant="f32", say=quiet)
        assert gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == \
            {"qwen2": "qwen2", "mistral": "llama"}[name]
        with torch.no_grad():
            want = model(input_ids=IDS).logits
        got = gguf_logits(out, IDS)
        assert torch.allclose(got, want, atol=1e-4), (name, float((got - want).abs().max()))


def test_the_adapter_gguf_is_llama_cpps_lora_format_and_adds_up_to_the_merged_model(lora_delta: Path,
                                                                                    tmp_path: Path) -> None:
    adapter, merged, base = tmp_path / "adapter.gguf", tmp_path / "merged.gguf", tmp_path / "base.gguf"
    assert main(["export", str(lora_delta), "--adapter-only", "-o", str(adapter), "--quant", "f32"]) == 0
    export_gguf(lora_delta, merged, quant="f32", say=quiet)
    base_name = json.loads((lora_delta / "adapter_config.json").read_text())["base_model_name_or_path"]
    export_gguf(None, base, base=base_name, quant="f32", say=quiet)
    reader = gguf.GGUFReader(str(adapter))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["general.architecture"].contents() == "llama"
    alpha = reader.fields["adapter.lora.alpha"].contents()
    assert alpha == pytest.approx(16.0)
    lora = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
    assert len(lora) == 2 * 7 * 2 and "blk.0.attn_q.weight.lora_a" in lora and "blk.1.ffn_down.weight.lora_b" in lora
    assert lora["blk.0.attn_q.weight.lora_a"].shape == (4, 64) and lora["blk.0.attn_q.weight.lora_b"].shape == (64, 4)
    # llama.cpp computes W + alpha / r * B @ A in the base file's layout: that must be the merged file's W
    base_w = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(str(base)).tensors}
    merged_w = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(str(merged)).tensors}
    for name in (n.removesuffix(".lora_a") for n in lora if n.endswith(".lora_a")):
        a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
        np.testing.assert_allclose(base_w[name] + alpha / a.shape[0] * b @ a, merged_w[name], atol=1e-5,
                                   err_msg=name)


def test_rslora_scale_is_written_as_llama_cpps_alpha(tiny_llama_dir: Path, tmp_path: Path) -> None:
    data = write_chat_data(tmp_path / "d.jsonl", n=8)
    delta = tmp_path / "rs"
    assert main(train_args(tiny_llama_dir, data, delta, "train.max_steps=1", "method.use_rslora=true",
                           "method.alpha=8", "data.eval=null")) == 0
    out = tmp_path / "a.gguf"
    export_gguf(delta, out, adapter_only=True, say=quiet)
    # r 4, alpha 8: rsLoRA scales by 8 / sqrt(4) = 4; llama.cpp scales by alpha / r, so alpha = 16
    assert gguf.GGUFReader(str(out)).fields["adapter.lora.alpha"].contents() == pytest.approx(16.0)


def test_interleave_rope_rows_pairs_the_halves_of_each_head() -> None:
    rows = torch.arange(8.0).reshape(8, 1)  # two heads of 4: (0 1 | 2 3), (4 5 | 6 7)
    assert interleave_rope_rows(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_ollama_modelfile_has_the_training_prompt_format(lora_delta: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    result = export_gguf(lora_delta, out, quant="q8_0", ollama=True, say=quiet)
    text = (tmp_path / "Modelfile").read_text()
    assert result.modelfile == tmp_path / "Modelfile" and text.startswith(HEADER)
    assert "FROM ./model.gguf\n" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """Answer with one word."""' in text  # the run's data.system_prompt
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    tokenizer = load_delta(lora_delta, device="cpu").loaded.tokenizer
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}]
    want = tokenizer.apply_chat_template([{"role": "system", "content": "s"}, *messages], tokenize=False,
                                         add_generation_prompt=True)
    assert render_go_template(template, "s", messages) == want
    adapter = tmp_path / "ad" / "adapter.gguf"
    export_gguf(lora_delta, adapter, adapter_only=True, ollama=True, say=quiet)
    lines = (tmp_path / "ad" / "Modelfile").read_text().splitlines()
    assert "FROM ./base.gguf" in lines and "ADAPTER ./adapter.gguf" in lines


def render_go_template(template: str, system: str, messages: list[dict[str, str]]) -> str:
    """Render the subset of Go's text/template a Modelfile uses (if / else if / range / end, .System, .Role,
    .Content, eq, string literals, trim markers) as Ollama would, to check it against the tokenizer's template."""
    import re

    parts = re.split(r"(\{\{-?\s*.*?\s*-?\}\})", template)
    items: list[tuple[str, str]] = []  # ("text", s) or ("act", action)
    for part in parts:
        m = re.fullmatch(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", part)
        if m is None:
            items.append(("text", part))
            continue
        if m.group(1) and items and items[-1][0] == "text":
            items[-1] = ("text", items[-1][1].rstrip())
        items.append(("act", m.group(2)))
        if m.group(3):
            items.append(("trim", ""))
    for k in range(len(items) - 1):
        if items[k][0] == "trim" and items[k + 1][0] == "text":
            items[k + 1] = ("text", items[k + 1][1].lstrip())

    def parse(i: int, stops: tuple[str, ...]) -> tuple[list, int]:
        body: list = []
        while i < len(items):
            kind, value = items[i]
            if kind == "act" and value.startswith(stops):
                return body, i
            if kind == "act" and value.startswith("if "):
                branches, i = [], i
                while items[i][1] != "end":
                    cond = items[i][1].removeprefix("else ").removeprefix("if ").strip() if items[i][1] != "else" \
                        else "true"
                    sub, i = parse(i + 1, ("else", "end"))
                    branches.append((cond, sub))
                body.append(("if", branches))
            elif kind == "act" and value.startswith("range "):
                sub, i = parse(i + 1, ("end",))
                body.append(("range", sub))
            else:
                body.append((kind, value))
            i += 1
        return body, i

    def holds(cond: str, scope: dict[str, str]) -> bool:
        if cond == "true":
            return True
        if cond.startswith("eq "):
            _, key, literal = cond.split(" ", 2)
            return scope.get(key) == literal.strip('"')
        return bool(scope.get(cond))

    def render(body: list, scope: dict[str, str]) -> str:
        out = ""
        for kind, value in body:
            if kind == "text":
                out += value
            elif kind == "trim":
                continue
            elif kind == "act":
                out += value.strip('"') if value.startswith('"') else scope.get(value, "")
            elif kind == "if":
                out += next((render(sub, scope) for cond, sub in value if holds(cond, scope)), "")
            elif kind == "range":
                out += "".join(render(value, {**scope, ".Role": m["role"], ".Content": m["content"]})
                               for m in messages)
        return out

    tree, _ = parse(0, ())
    return render(tree, {".System": system})


def test_the_chat_format_reproduces_the_tokenizers_template(lora_delta: Path) -> None:
    from deltatune.export.modelfile import chat_format

    tokenizer = load_delta(lora_delta, device="cpu").loaded.tokenizer
    fmt, default = chat_format(tokenizer)
    assert fmt.name == "chatml"
    assert default is not None and "SmolLM" in default  # SmolLM2's template adds its own system prompt
    turns = [("user", "a"), ("assistant", "b"), ("user", "c")]
    messages = [{"role": "system", "content": "s"}] + [{"role": r, "content": c} for r, c in turns]
    assert fmt.render("s", turns, True) == tokenizer.apply_chat_template(messages, tokenize=False,
                                                                         add_generation_prompt=True)


def test_methods_that_cannot_fold_and_other_bad_input_stop_with_one_line(
        lora_delta: Path, tiny_llama_dir: Path, tiny_bert_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    data = write_chat_data(tmp_path / "d.jsonl", n=8)
    prompt = tmp_path / "prompt"
    assert main([a for a in train_args(tiny_llama_dir, data, prompt, "train.max_steps=1", "data.eval=null",
                                       "method.name=prompt_tuning") if a != "method.r=4"]) == 0
    dora = tmp_path / "dora"
    assert main(train_args(tiny_llama_dir, data, dora, "train.max_steps=1", "method.use_dora=true",
                           "data.eval=null")) == 0
    existing = tmp_path / "exists.gguf"
    existing.write_text("not a gguf")
    capsys.readouterr()
    cases = [
        (["export", str(prompt), "-o", str(tmp_path / "p.gguf")], "prompt_tuning delta", "lora"),
        (["export", str(dora), "--adapter-only", "-o", str(tmp_path / "d.gguf")], "DoRA", "drop --adapter-only"),
        (["export", str(tmp_path), "-o", str(tmp_path / "x.gguf")], "adapter_config.json: not found", ""),
        (["export", "--base", str(tiny_bert_dir), "-o", str(tmp_path / "b.gguf")], "BertLMHeadModel", "Qwen2"),
        (["export", str(lora_delta), "-o", str(tmp_path / "q.gguf"), "--quant", "q4_k_m"], "q4_k_m",
         "llama-quantize"),
        (["export", str(lora_delta), "-o", str(existing)], "exists; pass --force", ""),
        (["export", str(lora_delta), "-o", str(existing), "--force"], "is not a GGUF file", ""),
        (["export", str(lora_delta), "-o", str(tmp_path)], "is a folder", ""),
        (["export", "-o", str(tmp_path / "y.gguf")], "--base MODEL", ""),
    ]
    for argv, first, second in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("deltatune: ") and err.count("\n") == 1 and first in err and second in err, err
    assert existing.read_text() == "not a gguf"
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == ["exists.gguf"]


def test_force_replaces_a_gguf_file_and_a_failed_write_leaves_nothing(lora_delta: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "model.gguf"
    export_gguf(lora_delta, out, quant="q4_0", say=quiet)
    small = out.stat().st_size
    export_gguf(lora_delta, out, quant="q8_0", force=True, say=quiet)
    assert out.stat().st_size > small

    def disk_full(self: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(DeltatuneError, match="No space left on device"):
        export_gguf(lora_delta, tmp_path / "new.gguf", say=quiet)
    with pytest.raises(DeltatuneError, match="No space left on device"):
        export_gguf(lora_delta, out, quant="f16", force=True, say=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary file, old file intact
    assert gguf.GGUFReader(str(out)).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0


def test_q4_blocks_dequantize_close_to_the_weights() -> None:
    from deltatune.export.tensors import QUANTS, encode

    weights = np.random.default_rng(0).normal(0, 0.02, (64, 128)).astype(np.float32)
    for name, bound in (("q8_0", 0.002), ("q5_0", 0.01), ("q4_1", 0.02)):
        data, kind = encode(weights, QUANTS[name])
        assert np.abs(dequantize(data, kind).reshape(weights.shape) - weights).max() < bound * 2, name
    odd = np.ones((4, 48), dtype=np.float32)  # rows of 48 do not split into blocks of 32: f16 instead
    assert encode(odd, QUANTS["q4_0"])[1] == gguf.GGMLQuantizationType.F16
    assert encode(np.ones(8, dtype=np.float32), QUANTS["q4_0"])[1] == gguf.GGMLQuantizationType.F32


@pytest.mark.slow
def test_smollm2_with_a_lora_delta_exports_and_reads_back(smollm2_dir: Path, tmp_path: Path) -> None:
    """The bundled model, a LoRA delta with random B: f32 equal to the merged model, q8_0 close."""
    import deltatune as dt

    loaded = dt.load_model(dt.ModelConfig(name="default", device="cpu"))
    method = dt.attach(loaded.model, {"name": "lora", "r": 8, "alpha": 16})
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    delta = tmp_path / "delta"
    dt.save_delta(delta, method, loaded.model, loaded.source, task="causal_lm")
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 253, 5356, 30, 2, 198, 1, 520, 9531, 198]])
    want = merged_logits(delta, ids)
    for quant, bound in (("f32", 1e-3),):  # the other types: on the tiny models and in bench/export.py
        out = tmp_path / f"smollm2-{quant}.gguf"
        export_gguf(delta, out, quant=quant, say=quiet)
        gap = float((gguf_logits(out, ids) - want).abs().max())
        assert gap < bound, (quant, gap)


def test_llama_cpp_itself_computes_the_merged_models_logits(lora_delta: Path, tmp_path: Path) -> None:
    """Only where llama-cpp-python is installed (an optional peer: it compiles llama.cpp); make test skips it."""
    llama_cpp = pytest.importorskip("llama_cpp")
    merged, base, adapter = tmp_path / "merged.gguf", tmp_path / "base.gguf", tmp_path / "adapter.gguf"
    export_gguf(lora_delta, merged, quant="f32", say=quiet)
    export_gguf(lora_delta, adapter, adapter_only=True, quant="f32", say=quiet)
    _export_base(lora_delta, tmp_path)
    ids = IDS[0].tolist()
    want = merged_logits(lora_delta, IDS)[0].numpy()
    for path, lora in ((merged, None), (base, adapter)):
        llm = llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=64,
                              logits_all=True, verbose=False, n_threads=1)
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float32)
        # llama.cpp keeps its KV cache in f16: 4e-3 of the logits' spread here; a wrong layout is order 1
        assert np.abs(got - want).max() / want.std() < 1e-2, (path.name, float(np.abs(got - want).max()))


def test_a_base_on_the_export_types_grid_is_warned_about() -> None:
    from deltatune.export.tensors import QUANTS, base_on_grid, encode

    weights = np.random.default_rng(1).normal(0, 0.02, (64, 128)).astype(np.float32)
    data, kind = encode(weights, QUANTS["q4_1"])
    on_grid = dequantize(data, kind).reshape(weights.shape)  # as a base de-quantized from a Q4_1 GGUF
    assert base_on_grid(on_grid, QUANTS["q4_1"]) and not base_on_grid(weights, QUANTS["q4_1"])
    assert not base_on_grid(on_grid, QUANTS["q8_0"]) and not base_on_grid(on_grid, QUANTS["f16"])


@pytest.mark.slow
def test_exporting_the_bundled_model_to_its_own_type_warns(smollm2_dir: Path, tmp_path: Path) -> None:
    import deltatune as dt

    loaded = dt.load_model(dt.ModelConfig(name="default", device="cpu"))
    method = dt.attach(loaded.model, {"name": "bitfit"})
    dt.save_delta(tmp_path / "d", method, loaded.model, loaded.source, task="causal_lm")
    from deltatune.export import _warn_if_base_on_grid  # what export_gguf calls before writing
    from deltatune.export.tensors import QUANTS

    said: list[str] = []
    _warn_if_base_on_grid(tmp_path / "d", QUANTS["q4_1"], said.append)
    assert any("already lie exactly on q4_1's grid" in line for line in said)
    said.clear()
    _warn_if_base_on_grid(tmp_path / "d", QUANTS["q4_0"], said.append)
    assert not said
