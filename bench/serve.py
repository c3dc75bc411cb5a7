"""`deltatune serve` under load: SmolLM2 with 4 deltas (LoRA, IA3, BitFit, prompt tuning), C concurrent clients.

Each client sends chat requests built from ../shared/data/alpaca_en_demo.json (max_tokens 64, greedy, ignoring
the end of turn where the server allows it, so every request decodes 64 tokens), spread over the deltas,
streaming, against a server running in its own process. The load generator is a light asyncio + httpx client
(SSE lines parsed with json; the official `openai` SDK, which the tests use, spends enough CPU per chunk to
slow a server sharing two cores). Printed per server setup and C: generated tokens/s in aggregate, p50/p95 time
to first token (TTFT) and time per output token (TPOT), peak resident memory, and the tensors the server holds.

Contenders in the same run:
1. transformers + peft as users do it: one PeftModel per delta (BitFit, which peft lacks, through deltatune's
   loader), `generate` one request at a time; float32, and bfloat16 where the CPU has bf16 units.
2. `transformers serve --continuous-batching` on the LoRA delta merged into the base (one delta per server).
3. llama.cpp's server (llama-cpp-python, when installed with its server extras) on the merged LoRA delta
   exported to GGUF q8_0 (one delta per server).

Run from the project root after `make install` (and `make demo` for the int8 quality check):

    .venv/bin/python bench/serve.py [--clients 1,4,16,64] [--setups float32,int8,bfloat16] [--contenders all]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from machine import cpu_flags, cpu_name

ALPACA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpaca_en_demo.json"
OUT = Path("runs/bench-serve")
METHODS = {
    "lora": ["method.r=16", "method.alpha=32", "train.lr=2e-4"],
    "ia3": ["method.name=ia3"],
    "bitfit": ["method.name=bitfit"],
    "prompt": ["method.name=prompt_tuning", "method.num_virtual_tokens=8"],
}
SETUPS = {"float32": ["--precision", "fp32"], "int8": ["--quantize", "int8", "--precision", "fp32"],
          "bfloat16": ["--dtype", "bfloat16"]}


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
    """The q-quantile of ``values`` (nan when empty)."""
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def figures(tokens: int, seconds: float, ttft: list[float], tpot: list[float]) -> dict[str, float]:
    """The printed figures of one load run."""
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "ttft_p50": pct(ttft, 0.5),
            "ttft_p95": pct(ttft, 0.95), "tpot_p50": pct(tpot, 0.5), "tpot_p95": pct(tpot, 0.95)}


async def load(url: str, names: list[str], clients: int, per_client: int, max_tokens: int,
               extra: dict[str, Any]) -> dict[str, Any]:
    """Run ``clients`` concurrent clients, each sending ``per_client`` streaming chat requests one after another
    (request i to model ``names[i % len(names)]``); return the figures."""
    import httpx

    asks = prompts(clients * per_client)
    ttft: list[float] = []
    tpot: list[float] = []
    tokens = 0

    async def one(http: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        body = {"model": names[i % len(names)], "messages": asks[i], "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, **extra}
        started = time.perf_counter()
        first, chunks, usage = None, 0, None
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                    chunks += 1
                    first = first or time.perf_counter()
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
        end = time.perf_counter()
        count = usage if usage is not None else chunks
        tokens += count
        ttft.append((first or end) - started)
        if count > 1 and first is not None:
            tpot.append((end - first) / (count - 1))

    async def client(http: httpx.AsyncClient, c: int) -> None:
        for k in range(per_client):
            await one(http, c * per_client + k)

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=900, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http, c) for c in range(clients)))
        seconds = time.perf_counter() - started
    return {"clients": clients, "requests": len(asks), **figures(tokens, seconds, ttft, tpot)}


def start(argv: list[str], url: str, log: Path, timeout: float = 600) -> subprocess.Popen:
    """Start a server process writing to ``log`` (a pipe nobody reads would stall a talkative server once
    full); return once ``url``/v1/models answers."""
    import httpx

    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{' '.join(argv[:4])} ... exited: " + log.read_text()[-3000:])
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"{' '.join(argv[:4])} ... did not start within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server process (SIGTERM, then SIGKILL)."""
    proc.terminate()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def peak_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_server(label: str, argv: list[str], port: int, names: list[str], clients: list[int], per_client: int,
               max_tokens: int, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Start one server, put each load on it, stop it; return one row per C."""
    import httpx

    url = f"http://127.0.0.1:{port}"
    proc = start(argv, url, OUT / f"{''.join(c if c.isalnum() else '-' for c in label)}.log")
    rows = []
    try:
        for c in clients:
            row = {"setup": label, **asyncio.run(load(url, names, c, per_client, max_tokens, extra))}
            row["peak_mb"] = peak_mb(proc.pid)
            health = httpx.get(url + "/health", timeout=10)
            memory = health.json().get("memory_mb") if health.status_code == 200 else None
            if isinstance(memory, dict):
                row["tensors_mb"] = {k: v for k, v in memory.items() if k != "per_delta"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        stop(proc)
    return rows


def peft_contender(deltas: dict[str, Path], n: int, max_tokens: int, dtype: torch.dtype) -> dict[str, Any]:
    """transformers + peft: each delta a PeftModel on its own base copy, `generate` one request at a time (BitFit,
    which peft lacks, through deltatune's loader onto transformers). TTFT and TPOT from a streamer's clock."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    from deltatune.delta import load_delta, read_delta_info
    from deltatune.models import resolve_source

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            return None

    source = resolve_source(read_delta_info(next(iter(deltas.values()))).base_model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    models = {name: (load_delta(path, device="cpu").loaded.model.to(dtype) if name == "bitfit" else
                     PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source, dtype=dtype),
                                               str(path)).eval())
              for name, path in deltas.items()}
    names = list(models)
    tokens, ttft, tpot = 0, [], []
    started = time.perf_counter()
    for i, messages in enumerate(prompts(n)):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        clock = Clock()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = models[names[i % len(names)]].generate(
                **ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                pad_token_id=tokenizer.eos_token_id, streamer=clock)
        new = out.shape[1] - ids["input_ids"].shape[1]
        tokens += new
        first = clock.times[1]  # times[0]: the prompt
        ttft.append(first - t0)
        tpot.append((clock.times[-1] - first) / max(1, new - 1))
    seconds = time.perf_counter() - started
    return {"setup": f"transformers + peft, one at a time, {str(dtype).removeprefix('torch.')}", "clients": 1,
            "requests": n, **figures(tokens, seconds, ttft, tpot)}


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


def merged_lora() -> Path:
    """The LoRA delta merged into the base (`deltatune merge`, once)."""
    out = OUT / "lora-merged"
    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "deltatune", "merge", str(OUT / "lora"), str(out)], check=True)
    return out


def lora_gguf() -> Path:
    """The LoRA delta merged and exported to GGUF q8_0 (`deltatune export`, once)."""
    out = OUT / "lora.q8_0.gguf"
    if not out.is_file():
        subprocess.run([sys.executable, "-m", "deltatune", "export", str(OUT / "lora"), "-o", str(out),
                        "--quant", "q8_0"], check=True)
    return out


def table(rows: list[dict[str, Any]], base: float) -> None:
    """Print the rows as a markdown table (x peft: against contender 1 in float32)."""
    print("| setup | clients | requests | tokens/s (aggregate) | x peft fp32 | TTFT p50 / p95 s | TPOT p50 / p95 ms "
          "| peak MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        peak = f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-"
        print(f"| {r['setup']} | {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / base:.2f}x | {r['ttft_p50']:.2f} / {r['ttft_p95']:.2f} | "
              f"{r['tpot_p50'] * 1000:.0f} / {r['tpot_p95'] * 1000:.0f} | {peak} |")


def targets(rows: list[dict[str, Any]], quality: dict[str, float | None]) -> None:
    """Print each target of the serving issue with the measured figures and whether it holds."""
    def find(setup: str, clients: int) -> dict[str, Any] | None:
        return next((r for r in rows if r["setup"] == setup and r["clients"] == clients), None)

    peft = next(r for r in rows if r["setup"].startswith("transformers + peft") and r["setup"].endswith("float32"))
    cb = find("transformers serve --continuous-batching, float32", 16)
    print("\ntargets (C = clients):")
    for setup in SETUPS:
        ours = find(f"deltatune serve, {setup}", 16)
        alone = find(f"deltatune serve, {setup}", 1)
        if ours is None or alone is None:
            continue
        x = ours["tokens_per_s"] / peft["tokens_per_s"]
        print(f"  {setup}: C=16 {ours['tokens_per_s']:.0f} tok/s = {x:.1f}x peft (target 10x): "
              f"{'holds' if x >= 10 else 'misses'}")
        if cb is not None:
            print(f"  {setup}: C=16 above transformers serve --continuous-batching ({cb['tokens_per_s']:.0f} tok/s): "
                  f"{'holds' if ours['tokens_per_s'] > cb['tokens_per_s'] else 'misses'}")
        ratio = alone["tpot_p50"] / peft["tpot_p50"]
        print(f"  {setup}: C=1 TPOT {alone['tpot_p50'] * 1000:.1f} ms = {ratio:.2f} of peft's "
              f"{peft['tpot_p50'] * 1000:.1f} ms (target at most 0.5): {'holds' if ratio <= 0.5 else 'misses'}")
    fp32, int8 = (find("deltatune serve, float32", 1), find("deltatune serve, int8", 1))
    if fp32 and int8:
        speed = fp32["tpot_p50"] / int8["tpot_p50"]
        print(f"  int8 decoding, C=1: {speed:.2f}x float32 (target 1.5x): {'holds' if speed >= 1.5 else 'misses'}")
        f16, i16 = find("deltatune serve, float32", 16), find("deltatune serve, int8", 16)
        if f16 and i16:
            print(f"  int8 decoding, C=16: {f16['tpot_p50'] / i16['tpot_p50']:.2f}x float32 (TPOT); "
                  f"{i16['tokens_per_s'] / f16['tokens_per_s']:.2f}x in tokens/s")
    if quality.get("float32") is not None and quality.get("int8") is not None:
        gap = quality["int8"] - quality["float32"]  # type: ignore[operator]
        print(f"  int8 demo delta eval loss {quality['int8']:.4f} vs float32 {quality['float32']:.4f}: "
              f"{gap:+.4f} (target within 0.02): {'holds' if abs(gap) <= 0.02 else 'misses'}")
    for r in rows:
        held = r.get("tensors_mb")
        if held and r["clients"] == 16:
            total = held["base"] + held["deltas"] + held["kv_cache_peak"]
            print(f"  memory, {r['setup']}: tensors at most base {held['base']:.0f} + deltas {held['deltas']:.1f} + "
                  f"attention cache {held['kv_cache_peak']:.0f} = {total:.0f} MB (no copy of the base per delta); "
                  f"process peak {r['peak_mb']:.0f} MB (Python, torch and the HTTP stack included)")


def main() -> None:
    """Train the deltas once, run the contenders and the server setups under each load, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--setups", default="float32,int8,bfloat16",
                        help="deltatune serve setups (bfloat16 only where the CPU has bf16 units)")
    parser.add_argument("--contenders", default="peft,transformers-serve,llama-cpp")
    parser.add_argument("--contender-requests", type=int, default=8)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--quality-examples", type=int, default=64, help="held-out alpaca examples for eval loss")
    args = parser.parse_args()
    if not ALPACA.is_file():
        sys.exit(f"{ALPACA} not found: this benchmark reads the reference data beside the project")
    bf16 = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}", flush=True)
    deltas = train_deltas()
    names = list(deltas)
    clients = [int(c) for c in args.clients.split(",")]
    contenders = args.contenders.split(",")
    rows: list[dict[str, Any]] = []
    for dtype in [torch.float32, *([torch.bfloat16] if bf16 else [])]:
        row = peft_contender(deltas, args.contender_requests, args.max_tokens, dtype)
        rows.append(row)
        print(json.dumps(row), flush=True)
    python = [sys.executable, "-m", "deltatune", "serve"]
    for setup in args.setups.split(","):
        if setup == "bfloat16" and not bf16:
            print("bfloat16: this CPU has no bf16 units (avx512_bf16 / amx_bf16); skipped", flush=True)
            continue
        argv = [*python, *(f"{n}={p}" for n, p in deltas.items()), "--port", str(args.port), "--max-batch", "16",
                "--max-queue", "256", *SETUPS[setup]]
        rows += run_server(f"deltatune serve, {setup}", argv, args.port, names, clients, args.requests_per_client,
                           args.max_tokens, {"ignore_eos": True})
    if "transformers-serve" in contenders:
        merged = merged_lora()
        argv = [str(Path(sys.executable).parent / "transformers"), "serve", str(merged), "--continuous-batching",
                "--port", str(args.port), "--device", "cpu", "--dtype", "float32"]
        rows += run_server("transformers serve --continuous-batching, float32", argv, args.port, [str(merged)],
                           clients, args.requests_per_client, args.max_tokens, {})
    if "llama-cpp" in contenders:
        if importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("sse_starlette"):
            gguf = lora_gguf()
            argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(args.port),
                    "--n_threads", str(os.cpu_count() or 2), "--n_ctx", "2048", "--interrupt_requests", "False"]
            rows += run_server("llama.cpp server (llama-cpp-python), q8_0", argv, args.port, [str(gguf)], clients,
                               args.requests_per_client, args.max_tokens, {})
        else:
            print("llama.cpp server: llama-cpp-python with its server extras is not installed; skipped", flush=True)
    quality = {q or "float32": demo_quality(q, args.quality_examples) for q in (None, "int8")}
    print(json.dumps({"demo_delta_eval_loss": quality}), flush=True)
    print(f"\nSmolLM2-135M-Instruct, 4 deltas ({', '.join(names)}), max_tokens {args.max_tokens}, greedy, "
          f"{args.requests_per_client} requests per client; CPU: {cpu_name()}\n")
    table(rows, next(r for r in rows if r["setup"].endswith("float32"))["tokens_per_s"])
    targets(rows, quality)


if __name__ == "__main__":
    main()
