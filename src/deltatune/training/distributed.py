"""torch.distributed under torchrun: process group, rank helpers, DDP / FSDP2 wrapping, reductions, state.

    torchrun --nproc-per-node 2 -m deltatune train run.yaml          # or: deltatune train run.yaml --nproc 2

With ``WORLD_SIZE`` unset or 1 nothing here touches torch.distributed: :func:`init_distributed` returns
:data:`SINGLE` and every helper is a no-op, so a single process runs exactly as before.

How a step is split (W ranks, ``batch_size`` b, ``grad_accum`` g): every rank plans the same epoch of
micro-batches of b examples; an optimizer step takes the next g*W of them (what one process with
``grad_accum`` g*W would take) and rank r runs ``group[r::W]``. Every rank runs the same number of passes,
ceil(len(group) / W); a rank short of micro-batches (only in the last, short step of an epoch) runs a
repeat with weight 0, so FSDP's collectives stay matched and DDP's all-reduce sees every rank.

Loss normalisation: the step's supervised-token count N is all-reduced before the first backward, and each
pass backpropagates ``W * loss_sum / N``. DDP (and FSDP's reduce-scatter) average gradients over the W
ranks, so the gradient is ``sum over the step's tokens / N``: the single-process gradient.
"""

from __future__ import annotations

import datetime
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from deltatune.config import RunConfig
from deltatune.errors import ConfigError, DeltatuneError

FSDP_METHODS = ("full", "lora")
"""Methods tested under FSDP2; any other method with ``train.distributed=fsdp`` is a ConfigError (use ddp)."""

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: world size, rank, and how the model is spread (none | ddp | fsdp)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    kind: str = "none"
    backend: str = ""

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that prints and writes files."""
        return self.rank == 0

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Return the element-wise sum of ``values`` over every rank (``values`` unchanged in one process)."""
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Return ``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def main_first(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 only; return its result there (None elsewhere). A DeltatuneError on rank 0 is
        raised on every rank, so no rank waits for one that already stopped."""
        if not self.enabled:
            return fn()
        import torch.distributed as dist

        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except DeltatuneError as err:
                error = str(err)
        box: list[Any] = [error]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise DeltatuneError(box[0]) if self.is_main else DeltatuneError(f"rank 0: {box[0]}")
        return result


SINGLE = DistContext()


def env_world_size() -> int:
    """Return ``WORLD_SIZE`` as torchrun sets it (1 when not under torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_distributed(cfg: RunConfig) -> DistContext:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_*``).

    Returns :data:`SINGLE` in a single process. The backend is NCCL when the model goes to CUDA, else gloo;
    ``train.dist_timeout`` bounds every collective. Raises ConfigError for FSDP with an unsupported method.
    """
    world = env_world_size()
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    kind = "ddp" if cfg.train.distributed == "auto" else cfg.train.distributed
    if kind == "fsdp" and cfg.method.name not in FSDP_METHODS:
        raise ConfigError(f"train.distributed: fsdp supports the methods {', '.join(FSDP_METHODS)}; "
                          f"train {cfg.method.name!r} with train.distributed=ddp")
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and not cfg.model.device.startswith("cpu")
    if cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.train.dist_timeout))
    return DistContext(world=world, rank=rank, local_rank=local_rank, kind=kind, backend=backend)


def rank_config(cfg: RunConfig, ctx: DistContext) -> RunConfig:
    """Return ``cfg`` with the model placed on this rank's GPU (``cuda:LOCAL_RANK``) when on CUDA."""
    if ctx.backend != "nccl":
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.model.device = f"cuda:{ctx.local_rank}"
    return cfg


def teardown(ctx: DistContext) -> None:
    """Leave the process group (no-op in one process)."""
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def is_comm_failure(err: BaseException) -> bool:
    """Return True if ``err`` comes from a collective: a peer that died, a timeout, a broken connection."""
    import torch.distributed as dist

    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        k in text for k in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))


def step_share(group: Sequence[list[int]], rank: int, world: int) -> list[tuple[list[int], bool]]:
    """Return this rank's passes of one optimizer step: ``(example indices, real)`` pairs.

    Rank r takes ``group[r::world]``; every rank gets ceil(len(group) / world) passes, the missing ones
    being repeats of a micro-batch with ``real=False`` (weight 0). Over the ranks the real passes are
    exactly ``group``, each micro-batch once.
    """
    passes = -(-len(group) // world)
    mine = [(list(b), True) for b in group[rank::world]]
    filler = list(mine[-1][0] if mine else group[0])
    return mine + [(filler, False)] * (passes - len(mine))


# ----------------------------------------------------------------------------------------------------
# the model


def wrap_model(model: nn.Module, ctx: DistContext, probe: Callable[[nn.Module], torch.Tensor]) -> nn.Module:
    """Return the model to train on: DDP- or FSDP2-wrapped under torchrun, ``model`` itself otherwise.

    DDP: ``probe(model)`` (a loss of one micro-batch) is backpropagated once to find trainable parameters
    that get no gradient; only then is ``find_unused_parameters`` on. FSDP2: every transformer block is
    sharded on its own, then the root (embeddings, head, tied weights). FSDP changes ``model`` in place.
    """
    if ctx.kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        probe(model).backward()
        unused = any(p.grad is None for p in model.parameters() if p.requires_grad)
        model.zero_grad(set_to_none=True)
        unused = ctx.all_reduce_sum([float(unused)])[0] > 0
        device_ids = [ctx.local_rank] if ctx.backend == "nccl" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=unused)
        # loss.py asks the model for logits at supervised positions only when forward takes logits_to_keep:
        # show it the wrapped model's signature
        wrapped.forward = functools.update_wrapper(  # type: ignore[method-assign]
            functools.partial(DistributedDataParallel.forward, wrapped), model.forward)
        return wrapped
    if ctx.kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from deltatune.methods.base import block_names

        for name in block_names(model):
            fully_shard(model.get_submodule(name))
        fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside a DDP wrapper (the model itself otherwise); names and parameters unchanged."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


@contextmanager
def micro_batch(model: nn.Module, ctx: DistContext, sync: bool) -> Iterator[None]:
    """Within the block, forward and backward of one micro-batch; gradients are synchronised across ranks
    only when ``sync`` (the step's last micro-batch): DDP ``no_sync``, FSDP ``set_requires_gradient_sync``."""
    if ctx.kind == "ddp" and not sync:
        with model.no_sync():  # type: ignore[operator]
            yield
        return
    if ctx.kind == "fsdp":
        model.set_requires_gradient_sync(sync)  # type: ignore[operator]
    with nullcontext():
        yield


def as_float(value: torch.Tensor) -> float:
    """Return a scalar tensor (a DTensor under FSDP) as a Python float."""
    full = getattr(value, "full_tensor", None)
    return float(full() if callable(full) else value)


@contextmanager
def gathered(model: nn.Module, ctx: DistContext) -> Iterator[None]:
    """Within the block, an FSDP model holds its full (unsharded) parameters on every rank, so a method's
    ``delta_state_dict`` reads whole tensors; resharded afterwards. No-op without FSDP."""
    if ctx.kind != "fsdp":
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in groups:
        m.unshard()
    try:
        yield
    finally:
        for m in groups:
            m.reshard()


def full_tensors(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Return every parameter as a whole CPU tensor (sharded ones gathered: a collective under FSDP)."""
    out = {}
    for name, p in params.items():
        full = getattr(p, "full_tensor", None)
        out[name] = (full() if callable(full) else p).detach().cpu().contiguous()
    return out


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict[str, Any]:
    """Return the optimizer state to checkpoint: ``optimizer.state_dict()`` in one process; under torchrun the
    full (unsharded, parameter-name keyed) state on rank 0, gathered by every rank together."""
    if not ctx.enabled:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         ctx: DistContext) -> None:
    """Restore what :func:`optimizer_state` returned (each rank passes the full state; FSDP re-shards it)."""
    if not ctx.enabled:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
