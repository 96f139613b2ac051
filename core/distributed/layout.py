"""Where this process sits in a distributed job, read from the launcher's environment (no torch needed).

The job layout is read from the environment that the launcher exports, so the same entry point runs under
``torchrun``, the ``deepspeed`` launcher, ``srun`` (SLURM) or as a plain single process:

* torchrun: ``RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT``;
* deepspeed launcher: ``RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, CROSS_RANK, CROSS_SIZE, MASTER_ADDR/PORT``;
* SLURM: ``SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS (or SLURM_STEP_NUM_TASKS), SLURM_NODEID, SLURM_NNODES,
  SLURM_NODELIST`` (the first host of the node list becomes the master), with the port derived from the job id.

Kept free of torch so that launch planning (``dinoscope launch``) can read it without loading the training stack;
the process group itself is :mod:`core.distributed.env`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping

from core.errors import DinoscopeError

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
# SLURM gives no port; derive one from the job id so all tasks of a job agree and concurrent jobs differ.
_SLURM_PORT_BASE = 20000
_SLURM_PORT_SPAN = 20000


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
        """More than one process in the job."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Global rank 0 (the process that writes shared files)."""
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


def free_port(host: str = DEFAULT_MASTER_ADDR) -> int:
    """An unused TCP port on ``host`` (for single-node tests and one-process groups)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
