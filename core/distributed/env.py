"""Where this process sits in a distributed job, and the few collectives the trainer needs.

The job layout is read from the environment that the launcher exports, so the same entry point runs under
``torchrun``, the ``deepspeed`` launcher, ``srun`` (SLURM) or as a plain single process:

* torchrun: ``RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT``;
* deepspeed launcher: ``RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, CROSS_RANK, CROSS_SIZE, MASTER_ADDR/PORT``;
* SLURM: ``SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS (or SLURM_STEP_NUM_TASKS), SLURM_NODEID, SLURM_NNODES,
  SLURM_NODELIST`` (the first host of the node list becomes the master), with the port derived from the job id.

Every helper is an identity or a no-op when no process group exists, so single-process code needs no branches.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import re
import socket
import time
import types
import weakref
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from core.errors import DinoscopeError

log = logging.getLogger(__name__)

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
# SLURM gives no port; derive one from the job id so all tasks of a job agree and concurrent jobs differ.
_SLURM_PORT_BASE = 20000
_SLURM_PORT_SPAN = 20000
_GRAD_BUCKET_NUMEL = 8 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """Rank layout of the current process.

    Attributes:
        rank: global rank in ``[0, world_size)``.
        local_rank: rank among the processes of this node (selects the GPU).
        world_size: number of processes in the job.
        local_world_size: number of processes on this node.
        master_addr, master_port: rendezvous address of rank 0.
        node_rank: index of this node in ``[0, num_nodes)``.
        num_nodes: number of nodes in the job.
        launcher: ``torchrun``, ``deepspeed``, ``slurm`` or ``single``: which environment was read.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = DEFAULT_MASTER_ADDR
    master_port: int = DEFAULT_MASTER_PORT
    node_rank: int = 0
    num_nodes: int = 1
    launcher: str = "single"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        """Read the layout from ``environ`` (default ``os.environ``); single-process defaults when nothing is set."""
        env = os.environ if environ is None else environ
        try:
            if "RANK" in env and "WORLD_SIZE" in env:
                return _from_torch_launcher(env)
            if "SLURM_PROCID" in env and ("SLURM_NTASKS" in env or "SLURM_STEP_NUM_TASKS" in env):
                return _from_slurm(env)
        except ValueError as err:
            raise DinoscopeError(
                f"the launcher environment is malformed ({err})",
                field="environment",
                fix="launch with torchrun, the deepspeed launcher or srun, or unset RANK/WORLD_SIZE "
                "and the SLURM_* variables for a single-process run",
            ) from None
        return cls(
            master_addr=env.get("MASTER_ADDR", DEFAULT_MASTER_ADDR),
            master_port=int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)),
        )


def _from_torch_launcher(env: Mapping[str, str]) -> DistEnv:
    world_size = int(env["WORLD_SIZE"])
    rank = int(env["RANK"])
    is_deepspeed = "LOCAL_SIZE" in env or "CROSS_RANK" in env
    local_world_size = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world_size)))
    local_world_size = max(1, local_world_size)
    node_rank = int(env.get("GROUP_RANK", env.get("CROSS_RANK", rank // local_world_size)))
    num_nodes = int(env.get("CROSS_SIZE", max(1, world_size // local_world_size)))
    layout = DistEnv(
        rank=rank,
        local_rank=int(env.get("LOCAL_RANK", rank % local_world_size)),
        world_size=world_size,
        local_world_size=local_world_size,
        master_addr=env.get("MASTER_ADDR", DEFAULT_MASTER_ADDR),
        master_port=int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)),
        node_rank=node_rank,
        num_nodes=num_nodes,
        launcher="deepspeed" if is_deepspeed else "torchrun",
    )
    _check_ranks(layout)
    return layout


def _from_slurm(env: Mapping[str, str]) -> DistEnv:
    world_size = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    num_nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")))
    nodelist = env.get("SLURM_STEP_NODELIST", env.get("SLURM_NODELIST", env.get("SLURM_JOB_NODELIST", "")))
    job_id = env.get("SLURM_JOB_ID", env.get("SLURM_JOBID", ""))
    default_port = _SLURM_PORT_BASE + int(job_id) % _SLURM_PORT_SPAN if job_id.isdigit() else DEFAULT_MASTER_PORT
    layout = DistEnv(
        rank=int(env["SLURM_PROCID"]),
        local_rank=int(env.get("SLURM_LOCALID", "0")),
        world_size=world_size,
        local_world_size=max(1, world_size // max(1, num_nodes)),
        master_addr=env.get("MASTER_ADDR") or (first_slurm_host(nodelist) if nodelist else DEFAULT_MASTER_ADDR),
        master_port=int(env.get("MASTER_PORT", default_port)),
        node_rank=int(env.get("SLURM_NODEID", "0")),
        num_nodes=num_nodes,
        launcher="slurm",
    )
    _check_ranks(layout)
    return layout


def _check_ranks(layout: DistEnv) -> None:
    if not 0 <= layout.rank < layout.world_size:
        raise ValueError(f"rank {layout.rank} is outside [0, world_size={layout.world_size})")


def first_slurm_host(nodelist: str) -> str:
    """First host of a compressed SLURM node list: ``gpu[003-005,010],cpu1`` -> ``gpu003``."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", first)
    if match is None:
        return first
    prefix, ranges, suffix = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def default_backend() -> str:
    """``nccl`` when CUDA is usable, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port(host: str = DEFAULT_MASTER_ADDR) -> int:
    """An unused TCP port on ``host`` (for single-node tests and one-process groups)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


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
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if has_process_group() else 0


def get_world_size() -> int:
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
