"""`deltatune serve` under load: SmolLM2 with 4 deltas (LoRA, IA3, BitFit, prompt tuning), C concurrent clients.

Each client sends chat requests built from ../shared/data/alpaca_en_demo.json (max_tokens 64, greedy, ignoring
the end of turn so every request decodes 64 tokens), spread over the deltas, streaming, through the official
`openai` client against `deltatune serve` running in its own process. Printed per C: generated tokens/s in
aggregate, p50/p95 time to first token (TTFT) and time per output token (TPOT), and the server's peak memory.
The contender in the same run is transformers + peft as users do it: each delta a PeftModel, requests one at a
time with `generate` (its throughput does not depend on C; its TTFT under C clients is its queue).
Run from the project root:

    .venv/bin/python bench/serve.py [--clients 1,4,16,64] [--requests-per-client 2] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from machine import cpu_name

ALPACA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpaca_en_demo.json"
OUT = Path("runs/bench-serve")
METHODS = {
    "lora": ["method.r=16", "method.alpha=32", "train.lr=2e-4"],
    "ia3": ["method.name=ia3"],
    "bitfit": ["method.name=bitfit"],
    "prompt": ["method.name=prompt_tuning", "method.num_virtual_tokens=8"],
}


def train_deltas() -> dict[str, Path]:
    """A few training steps per method on alpaca (once; reused when present)."""
    from deltatune.config import load_config
    from deltatune.training.loop import train

    deltas = {}
    for name, extra in METHODS.items():
        out = OUT / name
        if not (out / "adapter_model.safetensors").is_file():
            train(load_config(None, [f"data.train={ALPACA}", "data.eval=null", "train.max_steps=3",
                                     "train.batch_size=4", f"output.dir={out}", "output.overwrite=true", *extra]),
                  progress=False)
        deltas[name] = out
    return deltas


def prompts(n: int) -> list[list[dict[str, str]]]:
    """``n`` chat prompts from alpaca (instruction + input)."""
    rows = json.loads(ALPACA.read_text())
    return [[{"role": "user", "content": (r["instruction"] + ("\n\n" + r["input"] if r.get("input") else ""))[:600]}]
            for r in rows[:n]]


def pct(values: list[float], q: float) -> float:
    """The q-quantile of ``values``."""
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def load(url: str, clients: int, per_client: int, max_tokens: int, names: list[str]) -> dict[str, Any]:
    """Run ``clients`` concurrent clients, each sending ``per_client`` streaming requests; return the figures."""
    import openai

    api = openai.AsyncOpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
    asks = prompts(clients * per_client)
    ttft: list[float] = []
    tpot: list[float] = []
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        started = time.perf_counter()
        first, count = None, 0
        stream = await api.chat.completions.create(
            model=names[i % len(names)], messages=asks[i], max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter()
            if chunk.usage is not None:
                count = chunk.usage.completion_tokens
        end = time.perf_counter()
        tokens += count
        ttft.append((first or end) - started)
        if count > 1 and first is not None:
            tpot.append((end - first) / (count - 1))

    async def client(c: int) -> None:
        for k in range(per_client):
            await one(c * per_client + k)

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    seconds = time.perf_counter() - started
    return {"clients": clients, "requests": len(asks), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
            "tpot_p50": pct(tpot, 0.5), "tpot_p95": pct(tpot, 0.95)}


def start_server(deltas: dict[str, Path], port: int, quantize: str | None) -> subprocess.Popen:
    """`deltatune serve` with every delta, in its own process; returns once it answers."""
    import openai

    argv = [sys.executable, "-m", "deltatune", "serve", *(f"{n}={p}" for n, p in deltas.items()),
            "--port", str(port), "--max-batch", "16", "--max-queue", "256",
            *(["--quantize", quantize] if quantize else [])]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            api.models.list()
            return proc
        except openai.APIConnectionError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("the server did not start: " + (proc.stdout.read() if proc.stdout else ""))


def peak_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peft_contender(deltas: dict[str, Path], n: int, max_tokens: int) -> dict[str, Any]:
    """transformers + peft: each delta a PeftModel on its own base copy, `generate` one request at a time (BitFit,
    which peft lacks, through deltatune's loader onto transformers)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.delta import load_delta, read_delta_info
    from deltatune.models import resolve_source

    source = resolve_source(read_delta_info(next(iter(deltas.values()))).base_model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    models = {name: (load_delta(path, device="cpu").loaded.model if name == "bitfit" else
                     PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source), str(path)).eval())
              for name, path in deltas.items()}
    names = list(models)
    asks = prompts(n)
    tokens, tpot, latency = 0, [], []
    started = time.perf_counter()
    for i, messages in enumerate(asks):
        model = models[names[i % len(names)]]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        took = time.perf_counter() - t0
        new = out.shape[1] - ids["input_ids"].shape[1]
        tokens += new
        latency.append(took)
        tpot.append(took / new)
    seconds = time.perf_counter() - started
    return {"requests": n, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "tpot_p50": pct(tpot, 0.5), "request_p50": pct(latency, 0.5)}


def demo_quality(quantize: str | None, n: int) -> float | None:
    """Eval loss of the demo delta (runs/demo, `make demo`) on held-out alpaca examples, through the server's own
    model (float32 or int8 weights); None without a demo delta."""
    from deltatune.data import load_examples, tokenize_examples
    from deltatune.evaluate import eval_loss
    from deltatune.serving import build_engine
    from deltatune.serving.rowwise import row_plan

    if not Path("runs/demo/adapter_model.safetensors").is_file():
        return None
    engine = build_engine({"demo": Path("runs/demo")}, device="cpu", quantize=quantize)
    examples, _ = tokenize_examples(load_examples(str(ALPACA))[-n:], engine.tokenizer, task="causal_lm",
                                    max_length=512, truncation="drop", train_on_prompt=False, label2id=None)
    with row_plan(torch.tensor([engine.bank.slot("demo")])):  # one example per forward: one row, the demo's
        return eval_loss(engine.model, examples, task="causal_lm", batch_size=1, mode="pad",
                         pad_id=engine.tokenizer.pad_token_id, device=torch.device("cpu"), chunked=False)["eval_loss"]


def main() -> None:
    """Train the deltas once, run the contender and the server under each load, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--contender-requests", type=int, default=8)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--quality-examples", type=int, default=64, help="held-out alpaca examples for eval loss")
    args = parser.parse_args()
    if not ALPACA.is_file():
        sys.exit(f"{ALPACA} not found: this benchmark reads the reference data beside the project")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}", flush=True)
    deltas = train_deltas()
    names = list(deltas)
    contender = peft_contender(deltas, args.contender_requests, args.max_tokens)
    print(json.dumps({"contender": "peft + generate", **contender}), flush=True)
    rows = []
    for quantize in (None, "int8"):
        proc = start_server(deltas, args.port, quantize)
        try:
            for clients in (int(c) for c in args.clients.split(",")):
                row = asyncio.run(load(f"http://127.0.0.1:{args.port}", clients, args.requests_per_client,
                                       args.max_tokens, names))
                row["peak_mb"] = peak_mb(proc.pid)
                row["weights"] = quantize or "float32"
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    quality = {q or "float32": demo_quality(q, args.quality_examples) for q in (None, "int8")}
    print(json.dumps({"demo_delta_eval_loss": quality}), flush=True)
    print(f"\nSmolLM2-135M-Instruct, 4 deltas ({', '.join(names)}), max_tokens {args.max_tokens}, greedy; "
          f"CPU: {cpu_name()}\n")
    print("| setup | clients | requests | tokens/s (aggregate) | x peft | TTFT p50 / p95 s | TPOT p50 / p95 ms "
          "| peak MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = contender["tokens_per_s"]
    print(f"| transformers + peft, one request at a time | - | {contender['requests']} | {base:.1f} | 1.00x | - | "
          f"{contender['tpot_p50'] * 1000:.0f} / - | - |")
    for r in rows:
        print(f"| deltatune serve, {r['weights']} | {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / base:.2f}x | {r['ttft_p50']:.2f} / {r['ttft_p95']:.2f} | "
              f"{r['tpot_p50'] * 1000:.0f} / {r['tpot_p95'] * 1000:.0f} | {r['peak_mb']:.0f} |")
    if quality["float32"] is not None:
        gap = quality["int8"] - quality["float32"]
        print(f"\ndemo delta eval loss on {args.quality_examples} held-out alpaca examples: float32 "
              f"{quality['float32']:.4f}, int8 {quality['int8']:.4f} (difference {gap:+.4f})")


if __name__ == "__main__":
    main()
