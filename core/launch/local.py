"""Running a launch plan on this machine: in-process (``local``) or as N processes (``torchrun``, ``deepspeed``).

``torchrun`` also spans several machines without SLURM: the same command runs on every node, joined either by a
``static`` rendezvous (``--nnodes N --node_rank R --master_addr A --master_port P``, one node rank per machine) or
by ``c10d`` (``--rdzv_backend c10d --rdzv_endpoint A:P --rdzv_id ID``, ranks assigned as nodes join).

Every rank runs the same worker command, ``python -m core.cli launch RECIPE [k=v ...] --worker --output-dir RUN``,
which calls the recipe kind's ``run`` in-process; the rank layout comes from the environment the launcher exports
(:class:`core.distributed.env.DistEnv`), so the worker is the same under torchrun, the DeepSpeed launcher and SLURM.
Without CUDA, ``DS_ACCELERATOR=cpu`` is exported so DeepSpeed uses its CPU accelerator over gloo
(environment.md §2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from core.config.loader import to_yaml
from core.distributed.layout import DEFAULT_MASTER_PORT, DistEnv, free_port
from core.io import atomic_path, write_json
from core.launch import LaunchPlan

log = logging.getLogger(__name__)

LAUNCH_RECORD = "launch.json"


def _worker_args(plan: LaunchPlan) -> list[str]:
    """``core.cli launch RECIPE [k=v ...] --worker --output-dir RUN``: the module and arguments every rank runs."""
    return ["core.cli", "launch", str(plan.recipe_path), *plan.overrides, "--worker", "--output-dir", str(plan.run_dir)]


def worker_command(plan: LaunchPlan) -> list[str]:
    """The command every rank runs (the rank layout comes from the launcher's environment)."""
    return [sys.executable, "-m", *_worker_args(plan)]


def local_command(plan: LaunchPlan) -> list[str]:
    """The single-process equivalent of a launch (what ``--launcher local`` runs in-process)."""
    return [
        sys.executable,
        "-m",
        "core.cli",
        "launch",
        str(plan.recipe_path),
        *plan.overrides,
        "--output-dir",
        str(plan.run_dir),
    ]


def rdzv_id(plan: LaunchPlan) -> str:
    """The c10d job id: ``launch.rdzv_id``, else one derived from the run directory as the command names it, so
    every node running the same command agrees without a shared clock or random source."""
    if plan.resources.rdzv_id:
        return plan.resources.rdzv_id
    return "dinoscope-" + hashlib.sha1(str(plan.run_dir).encode()).hexdigest()[:12]


def _torchrun_rendezvous(plan: LaunchPlan, master_port: int | None) -> list[str]:
    """torchrun's rendezvous options: ``--standalone`` on one machine without an address, else the multi-node form."""
    res = plan.resources
    if not res.multi_node:
        return ["--standalone"]
    # Every node must agree on the port, so a free port of this machine would not do: torchrun's default instead.
    port = master_port or res.master_port or DEFAULT_MASTER_PORT
    if res.rdzv_backend == "c10d":
        return [
            f"--nnodes={res.nodes}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={res.master_addr}:{port}",
            f"--rdzv_id={rdzv_id(plan)}",
        ]
    return [
        f"--nnodes={res.nodes}",
        f"--node_rank={res.node_rank}",
        f"--master_addr={res.master_addr}",
        f"--master_port={port}",
    ]


def process_command(plan: LaunchPlan, master_port: int | None = None) -> list[str]:
    """The full multi-process command for ``torchrun`` or ``deepspeed`` (for torchrun on several nodes: the command
    of this node)."""
    n = plan.resources.nproc_per_node
    if plan.resources.launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *_torchrun_rendezvous(plan, master_port),
            f"--nproc_per_node={n}",
            "-m",
            *_worker_args(plan),
        ]
    if plan.resources.launcher == "deepspeed":
        port = master_port or plan.resources.master_port or free_port()
        # --no_local_rank: the worker reads LOCAL_RANK from the environment instead of a --local_rank argument.
        return [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            f"--num_gpus={n}",
            f"--master_port={port}",
            "--no_local_rank",
            "--module",
            *_worker_args(plan),
        ]
    raise ValueError(f"process_command does not handle launcher {plan.resources.launcher!r}")


def process_environment(
    plan: LaunchPlan, base: Mapping[str, str] | None = None, cuda: bool | None = None
) -> dict[str, str]:
    """Environment of the launched processes: ``base`` (default ``os.environ``), ``DS_ACCELERATOR=cpu`` without
    CUDA, one OpenMP thread per rank unless set, then the resources' ``env``."""
    env = dict(os.environ if base is None else base)
    if cuda is None:
        import torch  # deferred: launch planning stays torch-free (a recipe typo fails in < 2 s, test_launch.py)

        cuda = torch.cuda.is_available()
    if not cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
    if plan.resources.nproc_per_node > 1:  # only ranks sharing this machine compete for its cores
        env.setdefault("OMP_NUM_THREADS", "1")  # N ranks on one machine would otherwise oversubscribe the cores
    env.update({str(k): str(v) for k, v in plan.resources.env.items()})
    return env


def write_launch_record(plan: LaunchPlan, command: list[str] | str, extra: Mapping[str, object] | None = None) -> Path:
    """``RUN/launch.json``: the resources, world size and exact command, for reproducibility."""
    path = plan.run_dir / LAUNCH_RECORD
    write_json(
        path,
        {
            "recipe": str(plan.recipe_path),
            "kind": plan.kind_name,
            "overrides": plan.overrides,
            "world_size": plan.world_size,
            "resources": dataclasses.asdict(plan.resources),
            "command": command,
            "cwd": os.getcwd(),
            "time": time.time(),
            **dict(extra or {}),
        },
    )
    return path


def _write_run_files(plan: LaunchPlan) -> None:
    from core.train.run_info import write_run_info  # deferred: loads torch; launch planning stays torch-free

    plan.run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(plan.run_dir / "config.yaml") as tmp:
        tmp.write_text(to_yaml(plan.recipe))
    write_run_info(plan.run_dir, str(plan.recipe_path), plan.overrides)


def run_in_process(plan: LaunchPlan, *, record: bool = True) -> int:
    """Run the recipe kind's ``run`` in this process (one rank of whatever job this process belongs to).

    Rank 0 writes ``config.yaml`` and ``run_info.json``; training resumes from the run directory's latest
    checkpoint when there is one. ``record`` writes ``launch.json`` (off for ranks started by a launcher, whose
    parent wrote it).
    """
    from core.distributed.env import shutdown_distributed  # deferred: loads torch; launch planning stays torch-free

    layout = DistEnv.from_environ()
    if layout.is_main:
        if not plan.kind.owns_run_dir:
            _write_run_files(plan)
        if record:
            write_launch_record(plan, local_command(plan))
    status = int(plan.kind.run(plan.recipe, plan.run_dir) or 0)
    shutdown_distributed()
    return status


def run_processes(plan: LaunchPlan) -> int:
    """Start ``nproc_per_node`` local processes with torchrun or the DeepSpeed launcher; return their exit status."""
    command = process_command(plan)
    env = process_environment(plan)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    res = plan.resources
    # One record per run: with a static rendezvous node 0 writes it; c10d commands are the same on every node, so
    # whichever node writes last (atomically) leaves an equivalent record.
    if not res.multi_node or res.rdzv_backend == "c10d" or res.node_rank == 0:
        write_launch_record(plan, command, {"nodes": res.nodes} if res.multi_node else None)
    log.info("starting %d of %d processes: %s", res.nproc_per_node, plan.world_size, shlex.join(command))
    return subprocess.run(command, env=env, check=False).returncode


def describe(plan: LaunchPlan) -> str:
    """Dry-run text for the local launchers: what would run, with which environment."""
    lines = [
        "# dinoscope launch --dry-run: nothing was started",
        f"recipe:      {plan.recipe_path} (kind {plan.kind_name})",
        f"run dir:     {plan.run_dir} (resumes from its latest checkpoint)",
        f"launcher:    {plan.resources.launcher}, world size {plan.world_size}",
    ]
    if plan.resources.launcher == "local":
        lines += ["", "# runs in this process:", shlex.join(local_command(plan))]
    else:
        env = process_environment(plan, base={}, cuda=False)
        lines += [
            "",
            "# environment (without CUDA):",
            *(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())),
            "",
            "# command:",
            shlex.join(process_command(plan, master_port=plan.resources.master_port or 29500)),
            *_multi_node_note(plan),
            "",
            "# each rank runs:",
            shlex.join(worker_command(plan)),
        ]
    return "\n".join(lines)


def _multi_node_note(plan: LaunchPlan) -> list[str]:
    res = plan.resources
    if not res.multi_node:
        return []
    nodes = f"# {res.nodes} nodes x {res.nproc_per_node} processes = world size {plan.world_size}"
    if res.rdzv_backend == "c10d":
        note = (
            f"run the same command on every node; each joins the c10d store at {res.master_addr}:"
            f"{res.master_port or 29500} and is given its node rank there"
        )
    else:
        note = (
            f"run the same command on every node with --node-rank 0..{res.nodes - 1} (this is node "
            f"{res.node_rank}); node 0 must be reachable at {res.master_addr}"
        )
    return [f"{nodes}: {note}"]
