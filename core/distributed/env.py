"""The process group of a distributed job, and the few collectives the trainer needs.

The rank layout (:class:`DistEnv`, read from the launcher's environment) lives in the torch-free
:mod:`core.distributed.layout` and is re-exported here.

Every helper is an identity or a no-op when no process group exists, so single-process code needs no branches.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
import types
import weakref
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from core.distributed.layout import DEFAULT_MASTER_ADDR as DEFAULT_MASTER_ADDR
from core.distributed.layout import DEFAULT_MASTER_PORT as DEFAULT_MASTER_PORT
from core.distributed.layout import DistEnv, free_port
from core.distributed.layout import first_slurm_host as first_slurm_host

log = logging.getLogger(__name__)

_GRAD_BUCKET_NUMEL = 8 * 1024 * 1024


def default_backend() -> str:
    """``nccl`` when CUDA is usable, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, *, require_group: bool = False) -> DistEnv:
    """Join the process group described by the environment; a no-op for one process.

    Args:
        backend: ``gloo`` or ``nccl``; by default nccl on CUDA, gloo on CPU.
        require_group: create a one-process group even for world size 1 (DeepSpeed always needs one). The
            rendezvous variables are exported so that libraries reading the environment agree with us.

    Returns:
        the :class:`DistEnv` that was used.
    """
    layout = DistEnv.from_environ()
    if dist.is_available() and dist.is_initialized():
        return layout
    if not layout.is_distributed and not require_group:
        return layout
    if not layout.is_distributed and "MASTER_PORT" not in os.environ:
        layout = dataclasses.replace(layout, master_port=free_port())
    os.environ.update(
        RANK=str(layout.rank),
        LOCAL_RANK=str(layout.local_rank),
        WORLD_SIZE=str(layout.world_size),
        LOCAL_WORLD_SIZE=str(layout.local_world_size),
        MASTER_ADDR=layout.master_addr,
        MASTER_PORT=str(layout.master_port),
    )
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(layout.local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=layout.rank, world_size=layout.world_size)
    log.info(
        "joined %s process group: rank %d/%d (node %d/%d, local rank %d) via %s",
        backend,
        layout.rank,
        layout.world_size,
        layout.node_rank,
        layout.num_nodes,
        layout.local_rank,
        layout.launcher,
    )
    return layout


def shutdown_distributed() -> None:
    """Leave every process group and stop its communication threads before the interpreter exits; no-op without one.

    ``destroy_process_group`` only unregisters the groups: a gloo group's worker threads stop (are joined, with the
    GIL released) when the last Python reference to the group goes. A worker drops the tensors of each collective
    just after the caller's ``wait()`` returned, and dropping a tensor that has a Python object needs the GIL. If a
    group is still alive when interpreter finalization starts, a worker still doing that drop asks for the GIL
    too late: CPython ends the thread with ``pthread_exit``, whose unwinding hits a ``noexcept`` frame, so the
    process aborts (SIGABRT, "terminate called without an active exception") after its work succeeded.

    Groups do stay alive: torch modules with ``group=group.WORLD`` defaults bind the live group when they are first
    imported after ``init_process_group`` (``torch.distributed.nn.functional``, imported with ``torch._dynamo`` by
    the first optimizer built, so in every training run), and DeepSpeed holds its groups in module globals and engine
    objects. Hence: a barrier (no rank tears down while a peer is mid-collective), destroy, reset function defaults
    bound to the destroyed groups to ``None`` (what they are when imported before the group exists; ``None`` means
    the default group), collect, and only if something else still holds a group, hand over the GIL for a moment so
    that its workers finish their last release now rather than during finalization.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return

    def weak(group: object) -> weakref.ref | None:
        try:
            return weakref.ref(group)
        except TypeError:  # cannot watch it: counted as still referenced below
            return None

    def unbind_defaults(groups: list[object]) -> None:
        ids = {id(group) for group in groups}  # valid while the caller holds `groups`
        for fn in gc.get_objects():
            if isinstance(fn, types.FunctionType):
                if fn.__defaults__ and any(id(v) in ids for v in fn.__defaults__):
                    fn.__defaults__ = tuple(None if id(v) in ids else v for v in fn.__defaults__)
                if fn.__kwdefaults__ and any(id(v) in ids for v in fn.__kwdefaults__.values()):
                    fn.__kwdefaults__ = {k: None if id(v) in ids else v for k, v in fn.__kwdefaults__.items()}

    world = getattr(dist.distributed_c10d, "_world", None)
    # the default group and every new_group (DeepSpeed's too); only weak references from here on
    refs = [weak(group) for group in list(getattr(world, "pg_map", None) or [dist.group.WORLD])]

    dist.barrier()
    dist.destroy_process_group()

    alive = [group for group in (ref() for ref in refs if ref is not None) if group is not None]
    if alive:
        unbind_defaults(alive)
        del alive
        gc.collect()  # groups left in reference cycles (e.g. a finished DeepSpeed engine) go now
    lingering = sum(ref is None or ref() is not None for ref in refs)
    if lingering:
        # Still referenced (DeepSpeed's globals, a live engine, the caller): the threads live on until exit. Sleeping
        # releases the GIL, so a worker waiting for it to drop the tensors of the last collective finishes now.
        log.debug(
            "%d process group(s) still referenced after destroy_process_group; letting their threads settle", lingering
        )
        time.sleep(0.2)


def has_process_group() -> bool:
    """Whether ``torch.distributed`` is available and its default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank in the default process group, 0 without one."""
    return dist.get_rank() if has_process_group() else 0


def get_world_size() -> int:
    """Number of processes in the default process group, 1 without one."""
    return dist.get_world_size() if has_process_group() else 1


def is_main_process() -> bool:
    """True on global rank 0, and in any single-process run."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if has_process_group() and get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks, in place; returns ``tensor`` unchanged without a process group."""
    world_size = get_world_size()
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world_size)
    return tensor


def _buckets(tensors: Sequence[torch.Tensor], max_numel: int) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    numel = 0
    for tensor in tensors:
        if bucket and (numel + tensor.numel() > max_numel or tensor.dtype != bucket[0].dtype):
            yield bucket
            bucket, numel = [], 0
        bucket.append(tensor)
        numel += tensor.numel()
    if bucket:
        yield bucket


@torch.no_grad()
def average_gradients(params: Sequence[nn.Parameter], max_bucket_numel: int = _GRAD_BUCKET_NUMEL) -> None:
    """Mean of ``.grad`` over the process group, in place, flattened into buckets.

    A parameter that got a gradient on some rank but not on this one (an idle head) contributes zeros here, so all
    ranks issue the same collectives and end with the same gradients; one without a gradient anywhere stays None.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=params[0].device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    for p, any_grad in zip(params, has_grad.tolist(), strict=False):
        if any_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    world = get_world_size()
    for bucket in _buckets(grads, max_bucket_numel):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        offset = 0
        for grad in bucket:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


@torch.no_grad()
def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (tensors must already be on the backend's device)."""
    if get_world_size() > 1:
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)
