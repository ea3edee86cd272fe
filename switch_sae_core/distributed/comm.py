"""Process groups and collectives with clear errors: backend choice, timeouts, a differentiable all-to-all.

- `init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
  picks NCCL on CUDA and gloo on CPU, and sets a process-group timeout so a dead or hung rank turns
  into an error on the others instead of a hang.
- Every collective here runs inside `collective(name)`, which turns the backend's error (gloo:
  "Connection reset by peer", a timeout) into `RankFailureError` naming this rank and what to check.
- `all_to_all(x, out_splits, in_splits)` is `dist.all_to_all_single` with autograd: its backward is the
  reverse all-to-all, so gradients flow back to the rank each row came from.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import sys
from contextlib import contextmanager
from typing import Iterator, NoReturn, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import devices
from ..errors import SwitchSAEError

DEFAULT_TIMEOUT_S = 300.0  # a collective waiting longer than this fails (dead/hung peer)


class RankFailureError(SwitchSAEError, RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or ran out of memory."""


class DistributedConfigError(SwitchSAEError, ValueError):
    """The distributed setup cannot work (experts do not divide across ranks, batch not divisible...)."""


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Who this process is in the job. world_size == 1 runs without a process group (collectives no-op)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = "none"
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when collectives really communicate (a process group with more than one rank)."""
        return self.world_size > 1


def pick_backend(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for CPU tensors."""
    return "nccl" if device.type == "cuda" else "gloo"


def resolve_device(device: str, local_rank: int) -> torch.device:
    """'auto' -> this rank's GPU (cuda:LOCAL_RANK) if CUDA is available, else the CPU (`devices.resolve_device`,
    whose ValueError is re-raised as DistributedConfigError)."""
    try:
        dev = devices.resolve_device(device)
    except ValueError as e:
        raise DistributedConfigError(str(e)) from None
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S, *,
                     rank: Optional[int] = None, world_size: Optional[int] = None,
                     init_method: Optional[str] = None) -> DistContext:
    """Join (or create) the default process group and describe this process.

    Under torchrun everything comes from the environment; tests pass rank, world_size and a
    `file://` init_method instead. With world_size 1 and no process group, nothing is initialised."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = resolve_device(device, local_rank)
    backend = pick_backend(dev)
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), dev, dist.get_backend(), timeout_s)
    if world_size == 1 and init_method is None:
        return DistContext(0, 1, dev, "none", timeout_s)
    if init_method is None and "MASTER_ADDR" not in os.environ:
        raise DistributedConfigError(
            f"WORLD_SIZE={world_size} but MASTER_ADDR is not set: launch with "
            "`torchrun --nproc_per_node=P -m switch_sae_core.distributed ...` (it sets RANK, WORLD_SIZE, MASTER_ADDR)")
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:
        raise RankFailureError(f"rank {rank}/{world_size}: could not join the {backend} process group "
                               f"within {timeout_s:.0f}s (did every rank start?): {e}") from e
    return DistContext(rank, world_size, dev, backend, timeout_s)


def exit_now(code: int = 1) -> NoReturn:
    """Leave the process at once (stdout and stderr flushed), skipping the interpreter's finalization: after a
    RankFailureError (the message already printed), where tearing down a process group whose peer is gone can abort
    in the backend's destructors (gloo, now and then: 'terminate called without an active exception', SIGABRT) and
    hide the real exit status; and at the end of a finished run, where gloo's worker threads can still abort the same
    way while the interpreter finalizes (pytorch/pytorch#179291), after every file was written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def collective(ctx: DistContext, what: str) -> Iterator[None]:
    """Re-raise a backend failure inside a collective as RankFailureError with a useful message."""
    try:
        yield
    except RankFailureError:
        raise
    except (RuntimeError, dist.DistError) as e:
        raise RankFailureError(
            f"rank {ctx.rank}/{ctx.world_size}: collective '{what}' failed ({ctx.backend}). Another rank "
            f"probably died (see its log / torchrun's summary of which rank exited first), ran out of "
            f"memory, or did not reach this collective within the {ctx.timeout_s:.0f}s timeout. "
            f"Backend error: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def all_reduce_(ctx: DistContext, t: Tensor, what: str, op=dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce (no-op on one process)."""
    if ctx.active:
        with collective(ctx, what):
            dist.all_reduce(t, op=op)
    return t


def broadcast_(ctx: DistContext, t: Tensor, what: str, src: int = 0) -> Tensor:
    if ctx.active:
        with collective(ctx, what):
            dist.broadcast(t, src=src)
    return t


def barrier(ctx: DistContext, what: str) -> None:
    if ctx.active:
        with collective(ctx, what):
            # a tiny all-reduce instead of dist.barrier(): it honours the timeout on every backend
            dist.all_reduce(torch.zeros(1, device=ctx.device))


def long_barrier(ctx: DistContext, what: str, timeout_s: float = 24 * 3600) -> None:
    """A barrier with its own (long) timeout, for waits longer than the process group's, e.g. rank 0
    extracting activations while the others wait. A rank that dies still fails it at once (gloo)."""
    if ctx.active:
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        with collective(ctx, what):
            dist.all_reduce(torch.zeros(1), group=group)
        dist.destroy_process_group(group)


def all_gather_object(ctx: DistContext, obj, what: str) -> list:
    if not ctx.active:
        return [obj]
    out = [None] * ctx.world_size
    with collective(ctx, what):
        dist.all_gather_object(out, obj)
    return out


def exchange_counts(ctx: DistContext, send_counts_P: Tensor) -> Tensor:
    """(P,) rows this rank sends to each rank -> (P,) rows it will receive from each rank."""
    recv_counts_P = torch.empty_like(send_counts_P)
    with collective(ctx, "all-to-all of split sizes"):
        dist.all_to_all_single(recv_counts_P, send_counts_P)
    return recv_counts_P


def all_to_all_raw(ctx: DistContext, x: Tensor, out_splits: list[int], in_splits: list[int], what: str) -> Tensor:
    """Rows x[sum(in_splits[:r]) : ...] go to rank r; returns the rows received, grouped by source rank."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    with collective(ctx, what):
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(fctx, x: Tensor, ctx: DistContext, out_splits: list[int], in_splits: list[int], what: str):
        fctx.args = (ctx, out_splits, in_splits, what)
        return all_to_all_raw(ctx, x, out_splits, in_splits, what)

    @staticmethod
    def backward(fctx, g: Tensor):
        ctx, out_splits, in_splits, what = fctx.args
        return all_to_all_raw(ctx, g, in_splits, out_splits, what + " (backward)"), None, None, None, None


def all_to_all(ctx: DistContext, x: Tensor, out_splits: list[int], in_splits: list[int], what: str) -> Tensor:
    """Differentiable all-to-all: backward sends each row's gradient back to the rank it came from."""
    return _AllToAll.apply(x, ctx, out_splits, in_splits, what)
