"""``deltatune serve``: one base model, many deltas, an OpenAI-compatible endpoint with continuous batching.

    server = serve({"dates": "runs/demo", "support": "runs/support"}, port=0, background=True)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    client.chat.completions.create(model="dates", messages=[{"role": "user", "content": "..."}])
    server.stop()

Modules, one job each: ``rowwise`` (layers that apply each batch row's own delta), ``bank`` (the base and its
deltas, one slot each), ``engine`` (the continuous-batching decode loop), ``api`` (the HTTP API, FastAPI).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.errors import DeltatuneError


@dataclass
class Server:
    """A running server: its URL, the engine and bank behind it, and how to stop it."""

    url: str
    engine: Any
    bank: Any
    uvicorn_server: Any
    thread: threading.Thread | None = None

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting requests, let those in flight finish (up to ``timeout`` s), and shut down."""
        self.uvicorn_server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=timeout + 10)
        self.engine.stop(timeout)


def delta_names(specs: list[str]) -> dict[str, Path]:
    """Turn ``NAME=PATH`` or ``PATH`` arguments into ``{name: folder}`` (the folder's name by default); raise
    DeltatuneError for a name given twice."""
    named: dict[str, Path] = {}
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec else (Path(spec).resolve().name, "", spec)
        if not name or not path:
            raise DeltatuneError(f"serve: {spec!r}: give a delta folder, or NAME=FOLDER")
        if name in named:
            raise DeltatuneError(f"serve: the name {name!r} is given twice; name deltas NAME=FOLDER")
        named[name] = Path(path)
    return named


def build_engine(deltas: dict[str, str | Path], *, base: str | None = None, device: str = "auto",
                 dtype: str = "auto", quantize: str | None = None, max_batch: int = 16, max_queue: int = 64) -> Any:
    """Load the base once and every delta on it; return the (not yet started) Engine. The base defaults to the
    one the first delta was trained on; ``quantize="int8"`` stores its linear layers in int8 (see
    ``rowwise.int8_linear``), ``dtype`` is ``model.dtype`` (``bfloat16`` where the CPU has bf16 units)."""
    from deltatune.config import ModelConfig
    from deltatune.delta import read_delta_info
    from deltatune.models import load_model
    from deltatune.serving.bank import DeltaBank
    from deltatune.serving.engine import Engine

    if base is None:
        if not deltas:
            raise DeltatuneError("serve: give at least one delta folder, or --base MODEL to serve a base alone")
        base = read_delta_info(next(iter(deltas.values()))).base_model
    loaded = load_model(ModelConfig(name=base, device=device, dtype=dtype), task="causal_lm")
    bank = DeltaBank(loaded, base_name=Path(base).name if os.sep in base else base, quantize=quantize)
    for name, folder in deltas.items():
        bank.add(name, folder)
    return Engine(bank, loaded.tokenizer, max_batch=max_batch, max_queue=max_queue)


def serve(deltas: dict[str, str | Path], *, base: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, max_batch: int = 16, max_queue: int = 64, device: str = "auto",
          dtype: str = "auto", quantize: str | None = None, delta_root: str | Path | None = None,
          background: bool = False, say: Callable[[str], None] = print) -> Server:
    """Serve ``deltas`` ({name: folder}) on one base over the OpenAI API at ``host:port`` (0: a free port).

    With ``background`` the server runs in a thread and the returned Server's ``stop()`` ends it; otherwise this
    call blocks until the server is stopped (Ctrl-C or SIGTERM: requests in flight finish first) and returns it.
    With ``delta_root`` deltas under that folder can be added and removed while the server runs. The base is
    loaded, and every forward runs, in the engine's own thread (see ``_engine_in_own_thread``); a process that
    ran parallel torch work in another thread first (a notebook, a test) is served correctly but slower.
    """
    import uvicorn

    from deltatune.serving.api import build_app

    if delta_root is not None and not Path(delta_root).is_dir():
        raise DeltatuneError(f"serve: --delta-root {delta_root} is not a folder")
    engine = _engine_in_own_thread(deltas, base=base, device=device, dtype=dtype, quantize=quantize,
                                   max_batch=max_batch, max_queue=max_queue)
    app = build_app(engine, api_key=api_key, delta_root=Path(delta_root) if delta_root is not None else None)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    handle = Server("", engine, engine.bank, server)
    if background:
        server.config.install_signal_handlers = False  # type: ignore[attr-defined]
        handle.thread = threading.Thread(target=server.run, name="deltatune-http", daemon=True)
        handle.thread.start()
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        handle.url = _url(server, host)
        return handle
    say(_summary(engine, host, port))
    # uvicorn answers SIGINT/SIGTERM with a graceful shutdown, then raises the signal again under the handlers it
    # found: these (no-ops) make that an ordinary exit 0 once the requests in flight are answered
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.stop()
    return handle


def _engine_in_own_thread(deltas: dict[str, str | Path], **options: Any) -> Any:
    """Build the engine (load the base and deltas) in a new thread that then runs its decoding loop; return the
    engine once loaded, or raise what loading raised.

    All of the server's torch work happens in that one thread. Why: an OpenMP thread team is per calling thread,
    and once two threads have run parallel torch ops, libgomp sees more threads than cores and stops spinning
    between parallel regions; on two cores that made each decoding step about 1.7x slower (measured)."""
    built: Future[Any] = Future()

    def own() -> None:
        try:
            engine = build_engine(deltas, **options)
        except BaseException as err:  # handed to the caller
            built.set_exception(err)
            return
        built.set_result(engine)
        engine.run()

    threading.Thread(target=own, name="deltatune-engine", daemon=True).start()
    return built.result()


def _ignore(signum: int, frame: Any) -> None:
    return None


def _url(server: Any, host: str) -> str:
    port = server.servers[0].sockets[0].getsockname()[1] if server.servers else server.config.port
    return f"http://{host}:{port}"


def _summary(engine: Any, host: str, port: int) -> str:
    """The start-up lines: URL, the models served, memory."""
    import resource

    bank = engine.bank
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [f"serving on http://{host}:{port}/v1 (OpenAI API; GET /health)",
             f"  {bank.base_name} (the base)"]
    lines += [f"  {d.name}: {d.method} delta from {d.folder} ({d.nbytes / 1e6:.1f} MB)" for d in bank.deltas.values()]
    weights = "int8 (LLM.int8-style)" if bank.quantize == "int8" else str(next(bank.model.parameters()).dtype)
    held = engine.memory_mb()
    lines.append(f"memory: {rss:.0f} MB resident; tensors: base {held['base']:.0f} MB ({weights} linear layers), "
                 f"deltas {held['deltas']:.1f} MB, attention cache {held['kv_cache']:.0f} MB (grows with the "
                 f"requests); continuous batching up to {engine.max_batch} requests")
    return "\n".join(lines)


__all__ = ["Server", "build_engine", "delta_names", "serve"]
