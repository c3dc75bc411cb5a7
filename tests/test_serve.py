"""`deltatune serve`: many deltas on one tiny base, continuous batching, the real `openai` SDK against a live server
on a free loopback port, and OpenAI's error bodies."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from deltatune.delta import load_delta
from deltatune.errors import DeltatuneError
from deltatune.infer.generate import generate, render_prompt
from deltatune.serving import Server, build_engine, delta_names, serve
from deltatune.serving.engine import Event, Request, SamplingParams
from tests.test_train import train_args, write_chat_data

openai = pytest.importorskip("openai")

METHODS = {  # served per row: lora .. prefix; each on its own view of the base: adapter, full
    "lora": ("method.r=4", "train.lr=2e-2"),
    "dora": ("method.r=4", "method.use_dora=true", "train.lr=2e-2"),
    "ia3": ("method.name=ia3", "train.lr=5e-2"),
    "bitfit": ("method.name=bitfit", "train.lr=2e-2"),
    "prompt": ("method.name=prompt_tuning", "method.num_virtual_tokens=4", "train.lr=5e-2"),
    "ptuning": ("method.name=p_tuning", "method.num_virtual_tokens=4", "train.lr=5e-2"),
    "prefix": ("method.name=prefix_tuning", "method.num_virtual_tokens=4", "train.lr=5e-2"),
    "adapter": ("method.name=adapter", "train.lr=2e-2"),
    "full": ("method.name=full", "train.lr=1e-3"),
}
PROMPTS = ["What colour is apple number 3?", "What colour is sky number 8?", "Name a colour", "Say hi"]


@pytest.fixture(scope="module")
def deltas(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One trained delta per method family on the tiny Llama (a few steps at high rates, so each differs)."""
    root = tmp_path_factory.mktemp("serve")
    data = write_chat_data(root / "d.jsonl", n=16)
    out = {}
    for name, extra in METHODS.items():
        args = [a for a in train_args(tiny_llama_dir, data, root / name, "train.max_steps=4", "data.eval=null",
                                      *extra) if not (name not in ("lora", "dora") and a == "method.r=4")]
        from deltatune.cli import main

        assert main(args) == 0
        out[name] = root / name
    return out


def reference(folder: Path | None, base: Path, prompts: list[str], tokens: int) -> list[str]:
    """What `deltatune generate` answers (greedy) for the delta in ``folder`` (None: the base)."""
    if folder is None:
        from deltatune.config import ModelConfig
        from deltatune.models import load_model

        loaded = load_model(ModelConfig(name=str(base), device="cpu"))
        return generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=tokens)
    delta = load_delta(folder, device="cpu")
    return generate(delta.loaded.model, delta.loaded.tokenizer, prompts, max_new_tokens=tokens)


def test_a_mixed_batch_of_deltas_gives_each_deltas_own_greedy_reply(deltas: dict[str, Path],
                                                                    tiny_llama_dir: Path) -> None:
    engine = build_engine(deltas, base=str(tiny_llama_dir), device="cpu", max_batch=32)
    tokenizer, bank = engine.tokenizer, engine.bank
    jobs: dict[tuple[str, str], list[Event]] = {}
    for name in ["base", *deltas]:  # queued before the engine starts: all of them share the first batch
        for prompt in PROMPTS:
            events: list[Event] = []
            ids = tokenizer(render_prompt(tokenizer, [{"role": "user", "content": prompt}]),
                            add_special_tokens=False)["input_ids"]
            served = bank.deltas.get(name)
            engine.submit(Request(ids, served.slot if served else 0, SamplingParams(max_tokens=6, temperature=0),
                                  emit=events.append))
            jobs[name, prompt] = events
    engine.start()
    deadline = time.monotonic() + 60
    while any(not e or e[-1].finish_reason is None for e in jobs.values()) and time.monotonic() < deadline:
        time.sleep(0.02)
    engine.stop()
    replies = {}
    for name in ["base", *deltas]:
        want = reference(deltas.get(name), tiny_llama_dir, PROMPTS, 6)
        got = ["".join(e.text for e in jobs[name, p]).strip() for p in PROMPTS]
        assert got == want, name
        replies[name] = tuple(got)
    assert len(set(replies.values())) == len(replies)  # every delta answers differently: each row used its own


def test_requests_joining_a_running_batch_mid_way_still_get_their_own_greedy_reply(deltas: dict[str, Path],
                                                                                     tiny_llama_dir: Path) -> None:
    chosen = {n: deltas[n] for n in ("lora", "prefix", "dora")}
    engine = build_engine(chosen, base=str(tiny_llama_dir), device="cpu", max_batch=4)
    tokenizer, bank = engine.tokenizer, engine.bank
    engine.start()
    jobs: dict[tuple[str, str], list[Event]] = {}
    try:
        for i, (name, prompt) in enumerate([(n, p) for p in PROMPTS[:2] for n in chosen]):
            served = bank.deltas[name]
            events: list[Event] = []
            ids = tokenizer(render_prompt(tokenizer, [{"role": "user", "content": prompt}]),
                            add_special_tokens=False)["input_ids"]
            engine.submit(Request(ids, served.slot, SamplingParams(max_tokens=4 + 2 * i, temperature=0,
                                                                   ignore_eos=True),
                                  emit=events.append))
            jobs[name, prompt] = events
            deadline = time.monotonic() + 10
            while not events and time.monotonic() < deadline:  # join once the batch is running
                time.sleep(0.005)
        deadline = time.monotonic() + 60
        while any(not e or e[-1].finish_reason is None for e in jobs.values()) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        engine.stop()
    for (name, prompt), events in jobs.items():
        reply = "".join(e.text for e in events)
        want = reference(chosen[name], tiny_llama_dir, [prompt], events[-1].completion_tokens)[0]
        assert reply.strip() == want, (name, prompt)


def test_a_request_whose_prompt_fails_ends_alone_and_the_others_go_on(deltas: dict[str, Path],
                                                                       tiny_llama_dir: Path) -> None:
    engine = build_engine({"lora": deltas["lora"]}, base=str(tiny_llama_dir), device="cpu")
    real, calls = engine.bank.model_of, {"n": 0}

    def failing_once(group: int) -> torch.nn.Module:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory")
        return real(group)

    engine.bank.model_of = failing_once  # type: ignore[method-assign]
    events: list[list[Event]] = [[], []]
    for i in range(2):
        engine.submit(Request([1, 2, 3], 1, SamplingParams(max_tokens=3, temperature=0), emit=events[i].append))
    engine.start()
    deadline = time.monotonic() + 30
    while any(not e or e[-1].finish_reason is None for e in events) and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.stop()
    assert events[0][-1].finish_reason == "error" and "out of memory" in (events[0][-1].error or "")
    assert events[1][-1].finish_reason == "length" and events[1][-1].completion_tokens == 3


def test_the_batch_cache_keeps_each_rows_positions_through_joins_steps_and_leaves() -> None:
    from deltatune.serving.kv import KVSlots

    kv = KVSlots(layers=2, kv_heads=1, head_dim=2, rows=4, dtype=torch.float32, device="cpu")
    assert kv.nbytes() == 0  # nothing held while idle
    rows = {}
    for name, length in (("a", 3), ("b", 70), ("c", 5)):  # b outgrows the first allocation
        keys = [torch.full((1, 1, length, 2), float(ord(name) + layer)) for layer in range(2)]
        kv.append(keys, [k + 100 for k in keys])
        rows[name] = length
    cache = kv.step_cache()
    new = torch.arange(3, dtype=torch.float32)[:, None, None, None].expand(3, 1, 1, 2)
    keys, values = cache.update(new, new + 100, 1)
    assert keys.shape == (3, 1, 71, 2)
    assert torch.equal(keys[0, 0, 3], torch.zeros(2)) and torch.equal(keys[1, 0, 70], torch.ones(2))
    assert torch.equal(values[2, 0, 5], torch.full((2,), 102.0)) and torch.equal(values[2, 0, :5], keys[2, 0, :5] + 100)
    mask = kv.step_mask(boolean=True)[:, 0, 0]
    assert mask.sum(1).tolist() == [4, 71, 6]
    kv.advance()
    order = kv.remove([0])  # a leaves: c, the last row, takes its place
    assert order == [2, 1] and kv.lengths.tolist() == [6, 71]
    assert torch.equal(kv.keys[1][0, 0, :5], torch.full((5, 2), float(ord("c") + 1)))
    assert torch.equal(kv.keys[1][0, 0, 5], torch.full((2,), 2.0))  # c's step-written position moved too
    assert torch.equal(kv.values[0][1, 0, :70], torch.full((70, 2), float(ord("b") + 100)))
    kv.remove([0, 1])
    kv.shrink()
    assert kv.rows == 0 and kv.nbytes() == 0


def test_a_delta_on_its_own_view_waits_for_the_running_batch_and_then_gets_its_turn(
        deltas: dict[str, Path], tiny_llama_dir: Path) -> None:
    engine = build_engine({n: deltas[n] for n in ("lora", "adapter", "full")}, base=str(tiny_llama_dir),
                          device="cpu", max_batch=8)
    bank = engine.bank
    assert bank.deltas["lora"].group == 0 and bank.deltas["adapter"].group != bank.deltas["full"].group != 0

    def submit(name: str) -> Request:
        served = bank.deltas[name]
        request = Request([1, 2, 3], served.slot, SamplingParams(), emit=lambda e: None)
        engine.submit(request)
        return request

    first = [submit("lora"), submit("lora")]
    adapter, full = submit("adapter"), submit("full")
    later = submit("lora")
    with engine._cv:
        assert engine._admit() == [*first, later]  # the oldest request's group takes every free place
    engine._rows = [*first, later]  # as if running
    submit("lora")
    with engine._cv:
        assert engine._admit() == []  # other groups wait: no more of this one until its batch drains
    engine._rows = []
    with engine._cv:
        assert engine._admit() == [adapter]  # then the group waiting longest, alone in its batch
    engine._rows = [adapter]
    with engine._cv:
        assert engine._admit() == []
    engine._rows = []
    with engine._cv:
        assert engine._admit() == [full]


@pytest.fixture(scope="module")
def server(deltas: dict[str, Path], tiny_llama_dir: Path) -> Iterator[Server]:
    handle = serve(deltas, base=str(tiny_llama_dir), port=0, device="cpu", background=True, max_batch=8,
                   say=lambda text: None)
    yield handle
    handle.stop(timeout=5)


def client(server: Server, **kwargs: object) -> object:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, **kwargs)


def test_the_openai_client_lists_models_and_chats_with_each_delta(server: Server, deltas: dict[str, Path],
                                                                  tiny_llama_dir: Path) -> None:
    api = client(server)
    assert {m.id for m in api.models.list().data} == {tiny_llama_dir.name, *deltas}
    for name in deltas:
        reply = api.chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPTS[0]}],
                                            max_tokens=6, temperature=0)
        assert reply.choices[0].message.content.strip() == reference(deltas[name], tiny_llama_dir, PROMPTS[:1], 6)[0]
        assert reply.object == "chat.completion" and reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens >= 1 and reply.usage.total_tokens == \
            reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_sync_and_async_ends_with_done_and_equals_the_whole_reply(server: Server) -> None:
    api = client(server)
    messages = [{"role": "user", "content": PROMPTS[1]}]
    whole = api.chat.completions.create(model="lora", messages=messages, max_tokens=8, temperature=0)
    chunks = list(api.chat.completions.create(model="lora", messages=messages, max_tokens=8, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens >= 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")

    async def run() -> list[str]:
        api = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        streams = [await api.chat.completions.create(model=m, messages=messages, max_tokens=8, temperature=0,
                                                     stream=True) for m in ("lora", "ia3", "prompt")]

        async def read(stream: object) -> str:
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        return await asyncio.gather(*(read(s) for s in streams))

    lora, ia3, prompt = asyncio.run(run())
    assert lora == whole.choices[0].message.content and ia3 != lora and prompt != lora


def test_completions_stop_strings_and_seeded_sampling(server: Server) -> None:
    api = client(server)
    plain = api.completions.create(model="bitfit", prompt="The colour of the sky is", max_tokens=8, temperature=0)
    text = plain.choices[0].text
    assert plain.object == "text_completion" and text
    cut = text.strip()[:2]
    assert cut, text
    stopped = api.completions.create(model="bitfit", prompt="The colour of the sky is", max_tokens=8,
                                     temperature=0, stop=[cut])
    assert cut not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    a, b = (api.chat.completions.create(model="ia3", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                        temperature=1.0, seed=7).choices[0].message.content for _ in range(2))
    assert a == b


def test_bad_requests_get_openai_error_bodies(server: Server, deltas: dict[str, Path]) -> None:
    import httpx

    url = server.url + "/v1/chat/completions"
    chat = {"model": "lora", "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        (b"{not json", 400, None),
        (json.dumps({**chat, "model": "nope"}).encode(), 404, "model"),
        (json.dumps({**chat, "max_tokens": 0}).encode(), 400, "max_tokens"),
        (json.dumps({**chat, "temperature": "hot"}).encode(), 400, "temperature"),
        (json.dumps({"model": "lora", "messages": []}).encode(), 400, "messages"),
        (json.dumps({**chat, "messages": [{"role": "user", "content": "word " * 600}]}).encode(), 400, "messages"),
    ]
    for body, status, param in cases:
        answer = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
        assert answer.status_code == status, answer.text
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param or param is None
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    # the server still answers after every bad request
    assert client(server).chat.completions.create(model="lora", messages=chat["messages"], max_tokens=2).choices


def test_api_key_and_a_full_queue(deltas: dict[str, Path], tiny_llama_dir: Path) -> None:
    import httpx

    handle = serve({"lora": deltas["lora"]}, base=str(tiny_llama_dir), port=0, device="cpu", background=True,
                   api_key="s3cret", max_queue=0, say=lambda text: None)
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=handle.url + "/v1", api_key="wrong", max_retries=0).models.list()
        api = openai.OpenAI(base_url=handle.url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in api.models.list().data][-1] == "lora"
        busy = httpx.post(handle.url + "/v1/chat/completions", headers={"authorization": "Bearer s3cret"},
                          json={"model": "lora", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "rate_limit_error"
    finally:
        handle.stop(timeout=5)


def test_deltas_it_cannot_serve_are_refused_at_start(deltas: dict[str, Path], tiny_llama_dir: Path,
                                                     tmp_path: Path) -> None:
    with pytest.raises(DeltatuneError, match="runs on a float base; --quantize int8 serves lora, ia3"):
        build_engine({"a": deltas["adapter"]}, device="cpu", quantize="int8")
    other = tmp_path / "other-base"
    shutil.copytree(tiny_llama_dir, other)
    with pytest.raises(DeltatuneError, match=r"was trained on .* not on the served base"):
        build_engine({"lora": deltas["lora"]}, base=str(other), device="cpu")
    assert delta_names(["a=x", "y/z"]) == {"a": Path("x"), "z": Path("y/z")}
    with pytest.raises(DeltatuneError, match="given twice"):
        delta_names(["a=x", "a=y"])


def test_a_cancelled_request_leaves_the_batch_at_once(deltas: dict[str, Path], tiny_llama_dir: Path) -> None:
    engine = build_engine({"lora": deltas["lora"]}, base=str(tiny_llama_dir), device="cpu")
    engine.start()
    try:
        events: list[Event] = []
        ids = engine.tokenizer("hello", add_special_tokens=False)["input_ids"]
        request = Request(ids, 1, SamplingParams(max_tokens=100000, temperature=1.0, seed=1), emit=events.append)
        engine.submit(request)
        while not events:
            time.sleep(0.01)
        request.cancelled.set()
        deadline = time.monotonic() + 10
        while engine.busy() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.busy() == 0 and events[-1].finish_reason == "cancelled"
    finally:
        engine.stop(timeout=1)


def test_the_command_serves_until_sigterm_then_finishes_in_flight_requests_and_exits_0(
        deltas: dict[str, Path], tiny_llama_dir: Path) -> None:
    import os
    import signal
    import socket
    import subprocess
    import sys
    import threading

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "deltatune", "serve", f"dates={deltas['lora']}", "--base",
                             str(tiny_llama_dir), "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "DELTATUNE_API_KEY": "k3y"})
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith(f"serving on http://127.0.0.1:{port}/v1"), first + proc.stderr.read()
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k3y", max_retries=0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                api.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.1)
        result: dict[str, object] = {}

        def long_request() -> None:
            result["reply"] = api.chat.completions.create(model="dates", max_tokens=300, temperature=1.0, seed=3,
                                                          messages=[{"role": "user", "content": "Tell a story"}])

        worker = threading.Thread(target=long_request)
        worker.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # SIGTERM once the request is in flight (counted, not guessed)
            health = httpx.get(f"http://127.0.0.1:{port}/health", headers={"Authorization": "Bearer k3y"}, timeout=5)
            if health.json().get("busy"):
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        worker.join(timeout=60)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    reply = result["reply"]
    assert reply.choices[0].finish_reason in ("stop", "length")  # answered in full, not cut off
    assert "k3y" not in err and "Traceback" not in err


def test_the_python_api_serve_stays_a_function_after_the_package_is_imported() -> None:
    import deltatune as dt
    import deltatune.serving.engine

    assert callable(dt.serve) and dt.serve.__module__ == "deltatune"


@pytest.mark.slow
def test_the_demo_delta_answers_dates_through_the_api_as_generate_does(tmp_path: Path) -> None:
    """The bundled SmolLM2 with the demo's LoRA delta (trained here), eight held-out dates asked at once
    through the openai client: the same tokens as `deltatune generate`, and mostly right (the demo on 192 of its
    320 examples, 24 steps, to keep the suite short)."""
    from deltatune.cli import main
    from deltatune.data import load_examples
    from deltatune.evaluate import reference_pairs

    out = tmp_path / "demo"
    assert main(["train", f"output.dir={out}", "train.eval_generations=0", "data.max_examples=192",
                 "--no-progress"]) == 0
    pairs = reference_pairs(load_examples(str(out / "data" / "demo_eval.jsonl")))[:8]
    want = reference(out, Path(), [p for p, _ in pairs], 16)
    handle = serve({"dates": out}, port=0, background=True, say=lambda text: None)
    try:
        async def ask_all(model: str) -> list[str]:
            api = openai.AsyncOpenAI(base_url=handle.url + "/v1", api_key="-", max_retries=0)
            replies = await asyncio.gather(*(api.chat.completions.create(
                model=model, messages=p, max_tokens=16, temperature=0) for p, _ in pairs))
            return [r.choices[0].message.content.strip() for r in replies]

        got, base = asyncio.run(ask_all("dates")), asyncio.run(ask_all(handle.bank.base_name))
    finally:
        handle.stop(timeout=5)
    assert got == want

    def right(replies: list[str]) -> int:
        return sum(g == ref for g, (_, ref) in zip(replies, pairs, strict=True))

    assert right(got) >= 4 and right(base) == 0, (got, base)  # the short demo gets 5 of 8 here, the base none



def test_int8_matmul_splits_outlier_channels_off_like_llm_int8() -> None:
    from deltatune.serving.rowwise import Int8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    x = torch.randn(5, 3, 128)
    x[..., 7] *= 40  # one outlier channel, as LLM activations have
    want = linear(x).detach()
    got = Int8Linear(linear)(x)
    assert got.shape == want.shape
    assert float((got - want).abs().max() / want.abs().max()) < 0.02
    plain = Int8Linear(linear, threshold=float("inf"))(x)  # without the split, the outlier coarsens every token
    assert float((plain - want).abs().max()) > 3 * float((got - want).abs().max())


def test_int8_weights_keep_each_deltas_logits_close(deltas: dict[str, Path], tiny_llama_dir: Path) -> None:
    from deltatune.serving.rowwise import Int8Linear, row_plan

    ids = torch.tensor([[1, 33, 900, 4093, 2, 216, 4000, 17]])
    logits = {}
    weighted = {n: deltas[n] for n in ("lora", "ia3", "bitfit", "dora")}  # the deltas that act on weights
    for quantize in (None, "int8"):
        engine = build_engine(weighted, base=str(tiny_llama_dir), device="cpu", quantize=quantize)
        names = ["base", *weighted]
        slots = torch.tensor([engine.bank.slot(n) if n != "base" else 0 for n in names])
        with torch.no_grad(), row_plan(slots):
            out = engine.model(input_ids=ids.expand(len(names), -1)).logits  # prompt tuning's prefix aside
        logits[quantize] = out
    fp32, int8 = logits[None], logits["int8"]
    cosine = torch.nn.functional.cosine_similarity(int8.flatten(1), fp32.flatten(1))
    assert (cosine > 0.99).all(), cosine  # int8 rounding, per row
    # LoRA, IA3, BitFit and DoRA still change the output as in float32
    effect, kept = (fp32[1:] - fp32[0]).norm(dim=(1, 2)), (int8[1:] - int8[0]).norm(dim=(1, 2))
    assert ((kept - effect).abs() < 0.2 * effect).all(), (kept, effect)
    assert isinstance(engine.model.lm_head, Int8Linear)
    assert isinstance(engine.model.model.layers[0].mlp.down_proj.base, Int8Linear)


def test_deltas_are_added_and_removed_while_running_only_when_allowed(server: Server, deltas: dict[str, Path],
                                                                      tiny_llama_dir: Path, tmp_path: Path) -> None:
    import httpx

    off = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(deltas["ia3"])})
    assert off.status_code == 404 and "--allow-delta-updates" in off.json()["error"]["message"]
    root = deltas["lora"].parent
    handle = serve({"lora": deltas["lora"]}, base=str(tiny_llama_dir), port=0, device="cpu", background=True,
                   delta_root=root, say=lambda text: None)
    try:
        api = client(handle)
        url = handle.url + "/v1/"
        added = httpx.post(url + "load_lora_adapter", json={"lora_name": "late", "lora_path": str(deltas["ia3"])})
        assert added.status_code == 200, added.text
        assert "late" in {m.id for m in api.models.list().data}
        reply = api.chat.completions.create(model="late", messages=[{"role": "user", "content": PROMPTS[0]}],
                                            max_tokens=6, temperature=0)
        assert reply.choices[0].message.content.strip() == reference(deltas["ia3"], tiny_llama_dir, PROMPTS[:1], 6)[0]
        viewed = httpx.post(url + "load_lora_adapter", json={"lora_name": "ad", "lora_path": str(deltas["adapter"])})
        assert viewed.status_code == 200, viewed.text  # a method served on its own view of the base, too
        reply = api.chat.completions.create(model="ad", messages=[{"role": "user", "content": PROMPTS[0]}],
                                            max_tokens=6, temperature=0)
        want = reference(deltas["adapter"], tiny_llama_dir, PROMPTS[:1], 6)[0]
        assert reply.choices[0].message.content.strip() == want
        outside = tmp_path / "elsewhere"
        shutil.copytree(deltas["bitfit"], outside)
        refused = httpx.post(url + "load_lora_adapter", json={"lora_name": "o", "lora_path": str(outside)})
        assert refused.status_code == 400 and "--delta-root" in refused.json()["error"]["message"]
        twice = httpx.post(url + "load_lora_adapter", json={"lora_name": "late", "lora_path": str(deltas["ia3"])})
        assert twice.status_code == 400 and "given twice" in twice.json()["error"]["message"]
        assert httpx.post(url + "unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
        assert httpx.post(url + "unload_lora_adapter", json={"lora_name": "late"}).status_code == 404
        with pytest.raises(openai.NotFoundError):
            api.chat.completions.create(model="late", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        # the delta that stayed is untouched
        kept = api.chat.completions.create(model="lora", messages=[{"role": "user", "content": PROMPTS[0]}],
                                           max_tokens=6, temperature=0)
        assert kept.choices[0].message.content.strip() == reference(deltas["lora"], tiny_llama_dir, PROMPTS[:1], 6)[0]
    finally:
        handle.stop(timeout=5)


def test_the_vllm_engine_command_serves_lora_deltas_and_refuses_the_others(deltas: dict[str, Path],
                                                                           tiny_llama_dir: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from deltatune.cli import main
    from deltatune.serving.vllm import vllm_command

    command = vllm_command({"dates": deltas["lora"]}, base=None, host="127.0.0.1", port=9000, api_key="k",
                           max_batch=16)
    assert command[:3] == ["vllm", "serve", str(tiny_llama_dir)]
    assert command[command.index("--lora-modules") + 1] == f"dates={deltas['lora'].resolve()}"
    assert command[command.index("--max-lora-rank") + 1] == "8" and "k" not in command  # the key goes by env
    with pytest.raises(DeltatuneError, match="ia3 delta; vLLM serves LoRA deltas only"):
        vllm_command({"x": deltas["ia3"]}, base=None, host="h", port=1, api_key=None, max_batch=1)
    if shutil.which("vllm") is not None:
        pytest.skip("vLLM is installed here: the command would start it")
    # vLLM is not installed: one line saying how to get it
    assert main(["serve", f"dates={deltas['lora']}", "--engine", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "vLLM is not installed here" in err and err.count("\n") == 1


@pytest.mark.parametrize("offset", [0, 5])
def test_bf16_prefill_runs_prompts_rounded_up_to_64_and_keeps_only_the_prompt(offset: int) -> None:
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from deltatune.serving.engine import prefill

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    rows: list[int] = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[1]))
    prompt = torch.randint(3, 300, (37,)).tolist()
    prefix = [(torch.randn(1, 2, offset, 16, dtype=torch.bfloat16),) * 2 for _ in range(2)]
    cpu = torch.device("cpu")
    results = {}
    with torch.no_grad():
        for step in (1, 64):
            cache = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in prefix] if offset else None)
            results[step] = (prefill(model, prompt, cache, offset, step, 128, cpu), cache)
        assert rows == [37, 64]  # unrounded, then rounded up to 64
        (exact, exact_cache), (padded, padded_cache) = results[1], results[64]
        assert padded.shape == (1, 300)
        assert torch.allclose(padded.float(), exact.float(), atol=0.05)  # bf16: another row count, other rounding
        for a, b in zip(exact_cache.layers, padded_cache.layers, strict=True):
            assert b.keys.shape[2] == offset + 37  # the padding was cut off the cache
            assert torch.allclose(a.keys.float(), b.keys.float(), atol=0.05)
        # near the end of the context the padding stops at its last position: 80 + 37 + 11 = 128
        rows.clear()
        long_prefix = [(torch.randn(1, 2, 80, 16, dtype=torch.bfloat16),) * 2 for _ in range(2)]
        cache = DynamicCache(ddp_cache_data=long_prefix)
        prefill(model, prompt, cache, 80, 64, 128, cpu)
        assert rows == [48] and cache.layers[0].keys.shape[2] == 80 + 37
