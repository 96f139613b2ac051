"""Typed launch resources: how many processes, on which machines, for how long.

Resources are kept apart from recipes (style.md §6.3): a recipe says *what* to train, a resource file under
``recipes/launch/`` says *where*. Both go through the same strict loader (:func:`core.config.load_recipe`), so a
typo in a resource file fails naming the closest valid key. Precedence, lowest first: the defaults below, the
``--resources`` file, ``launch.<key>=value`` overrides on the command line, the dedicated ``--nodes``/``--nproc``/...
flags.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from core.config.fields import option
from core.config.loader import load_recipe
from core.errors import DinoscopeError

LAUNCHERS = ("local", "torchrun", "deepspeed", "slurm")
SUBMITIT_CLUSTERS = ("slurm", "local")
RDZV_BACKENDS = ("static", "c10d")
_MEM_RE = re.compile(r"^\d+(\.\d+)?([KMGT]B?)?$", re.IGNORECASE)
_SBATCH_RE = re.compile(r"^--([A-Za-z][A-Za-z0-9_-]*)(?:=(.+))?$")
_UNQUOTED_TIME_RE = re.compile(r"^time:[ \t]*([0-9][0-9-]*:[0-9:]*)[ \t]*(?:#.*)?$", re.MULTILINE)


@dataclass
class LaunchResources:
    """Everything the launcher needs besides the recipe.

    Attributes:
        launcher: ``local`` (one process, in-process), ``torchrun`` or ``deepspeed`` (``nproc_per_node`` processes
            on this machine) or ``slurm`` (a submitit job; one task per GPU).
        nodes: machines. SLURM allocates them; with ``torchrun`` the same command runs on every node (each with its
            own ``node_rank``); ``local`` and ``deepspeed`` run on this machine only.
        nproc_per_node: processes per machine for torchrun/deepspeed, and SLURM tasks per node without GPUs.
        gpus_per_node: GPUs per SLURM node; one task is started per GPU.
        cpus_per_task: CPU cores per task (0 = cluster default).
        mem: memory per node, SLURM syntax (``480G``; empty = cluster default; ``0`` = all of it).
        partition, account, qos, constraint: the SLURM options of the same names (empty = not set).
        time: wall-clock limit, SLURM syntax (``MM``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM:SS``).
        job_name: SLURM job name.
        sbatch_extra: further sbatch options, each ``--key=value`` or ``--flag``.
        setup: shell lines run before the tasks start (``module load ...``).
        env: environment variables set in every process.
        requeue: on pre-emption or near the time limit, requeue the job; it resumes from the run's latest checkpoint.
        max_timeout_requeues: how many times a job that hits its time limit is requeued.
        signal_delay_s: seconds before the limit at which SLURM warns the job (time to requeue cleanly).
        master_port: rendezvous port (0 = derived from the SLURM job id, a free port for one machine, torchrun's
            29500 across several nodes).
        node_rank: this machine's index in ``[0, nodes)`` for a multi-node ``torchrun`` launch with the ``static``
            backend (``c10d`` assigns node ranks itself).
        master_addr: host of node 0 (``static``) or of the rendezvous store (``c10d``), reachable from every node;
            required with ``torchrun`` on several nodes. SLURM derives it from the node list.
        rdzv_backend: torchrun rendezvous: ``static`` (fixed ``node_rank`` per machine, ``MASTER_ADDR:PORT``) or
            ``c10d`` (a TCP store at ``master_addr:master_port``; nodes join in any order and get ranks assigned).
        rdzv_id: ``c10d`` job id shared by all nodes (empty = derived from the run directory, which every node names
            the same way).
        global_batch_size: if set, ``train.batch_size_per_rank * world size`` must equal it (0 = no check).
        cluster: submitit cluster for ``launcher: slurm``: ``slurm`` (sbatch) or ``local`` (submitit's local executor,
            one machine, for testing the job function).
        submitit_dir: where submitit keeps job pickles and logs (default ``<run dir>/submitit``).
    """

    launcher: str = option(
        "local",
        help="local: this process; torchrun/deepspeed: --nproc local processes; slurm: a submitit job",
        choices=LAUNCHERS,
    )
    nodes: int = option(
        1,
        help="machines: SLURM nodes, or torchrun nodes each running this same command",
        flags=("--nodes", "--nnodes"),
        minimum=1,
    )
    nproc_per_node: int = option(1, help="processes on this machine (torchrun/deepspeed)", flags="--nproc", minimum=1)
    gpus_per_node: int = option(0, help="GPUs per SLURM node (one task each)", minimum=0)
    cpus_per_task: int = 0
    mem: str = ""
    partition: str = option("", help="SLURM partition")
    account: str = option("", help="SLURM account")
    qos: str = ""
    constraint: str = ""
    time: str = option("", help="SLURM time limit, e.g. 72:00:00")
    job_name: str = "dinoscope"
    sbatch_extra: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    requeue: bool = True
    max_timeout_requeues: int = 3
    signal_delay_s: int = 120
    master_port: int = option(0, help="rendezvous port (torchrun default 29500 across nodes; 0: automatic)", minimum=0)
    node_rank: int = option(0, help="torchrun on several nodes (static): this machine's index, 0..N-1", minimum=0)
    master_addr: str = option("", help="torchrun on several nodes: host of node 0 (of the c10d store)")
    rdzv_backend: str = option(
        "static",
        help="torchrun rendezvous on several nodes: static (--node-rank per machine) or c10d",
        choices=RDZV_BACKENDS,
    )
    rdzv_id: str = option("", help="c10d job id shared by every node (default: derived from the run directory)")
    global_batch_size: int = option(
        0, help="require train.batch_size_per_rank x world size to equal this (0: no check)", minimum=0
    )
    cluster: str = "slurm"
    submitit_dir: str = ""

    def validate(self, path: str | os.PathLike | None = None) -> None:
        """Impossible combinations fail here, before anything is started or submitted."""
        for key, value, valid in (
            ("launcher", self.launcher, LAUNCHERS),
            ("cluster", self.cluster, SUBMITIT_CLUSTERS),
            ("rdzv_backend", self.rdzv_backend, RDZV_BACKENDS),
        ):
            if value not in valid:
                raise DinoscopeError(
                    f"launch.{key} is {value!r}", path=path, field=f"launch.{key}", fix=f"use one of {valid}"
                )
        for key in ("nodes", "nproc_per_node"):
            if getattr(self, key) < 1:
                raise DinoscopeError(
                    f"launch.{key} must be at least 1, got {getattr(self, key)}", path=path, field=f"launch.{key}"
                )
        for key in (
            "gpus_per_node",
            "cpus_per_task",
            "max_timeout_requeues",
            "signal_delay_s",
            "master_port",
            "global_batch_size",
            "node_rank",
        ):
            if getattr(self, key) < 0:
                raise DinoscopeError(
                    f"launch.{key} must not be negative, got {getattr(self, key)}", path=path, field=f"launch.{key}"
                )
        if self.master_port > 65535:
            raise DinoscopeError(
                f"launch.master_port {self.master_port} is not a TCP port",
                path=path,
                field="launch.master_port",
                fix="use 1..65535, or 0 to choose one automatically",
            )
        if self.mem and not _MEM_RE.match(self.mem):
            raise DinoscopeError(
                f"launch.mem {self.mem!r} is not a SLURM memory size",
                path=path,
                field="launch.mem",
                fix="e.g. 480G, 512000M or 0 (all the node's memory)",
            )
        if self.time:
            parse_time_minutes(self.time, path)
        sbatch_options(self.sbatch_extra, path)
        self._validate_nodes(path)
        if self.launcher == "local" and self.nproc_per_node > 1:
            raise DinoscopeError(
                f"launcher 'local' runs one process, but launch.nproc_per_node is {self.nproc_per_node}",
                path=path,
                field="launch.nproc_per_node",
                fix="use --launcher torchrun (or deepspeed) for several local processes",
            )
        if self.launcher == "slurm" and self.cluster == "slurm" and not self.time:
            raise DinoscopeError(
                "a SLURM job needs a time limit",
                path=path,
                field="launch.time",
                fix="pass --time 72:00:00 or set time: in the resources file",
            )
        if self.launcher == "slurm" and self.cluster == "local" and self.nodes > 1:
            raise DinoscopeError(
                "submitit's local executor runs on one machine",
                path=path,
                field="launch.nodes",
                fix="use launch.cluster=slurm for several nodes",
            )

    def _validate_nodes(self, path: str | os.PathLike | None) -> None:
        """Multi-node layout: only torchrun (one command per node) and SLURM (one job) span several machines."""
        if self.launcher in ("local", "deepspeed") and self.nodes > 1:
            # The DeepSpeed launcher reaches other nodes over ssh with a hostfile; torchrun runs the same ZeRO
            # workers without either, so it is the one multi-node launcher outside SLURM.
            raise DinoscopeError(
                f"launcher {self.launcher!r} runs on this machine only, but launch.nodes is {self.nodes}",
                path=path,
                field="launch.nodes",
                fix="use --launcher torchrun (the same command on every node) or --launcher slurm "
                "for several nodes, or --nodes 1",
            )
        if self.node_rank >= self.nodes:
            raise DinoscopeError(
                f"launch.node_rank {self.node_rank} is outside [0, {self.nodes}) for {self.nodes} node(s)",
                path=path,
                field="launch.node_rank",
                fix=f"give each machine its own --node-rank from 0 to {self.nodes - 1}, or raise --nodes",
            )
        if self.launcher == "slurm" and (self.master_addr or self.node_rank):
            key = "master_addr" if self.master_addr else "node_rank"
            flag = "--" + key.replace("_", "-")
            raise DinoscopeError(
                f"launch.{key} is set, but SLURM derives the rendezvous from the job's node list",
                path=path,
                field=f"launch.{key}",
                fix=f"remove launch.{key} ({flag})",
            )
        if self.launcher == "torchrun" and self.nodes > 1 and not self.master_addr:
            raise DinoscopeError(
                f"a torchrun launch on {self.nodes} nodes needs the address of node 0",
                path=path,
                field="launch.master_addr",
                fix="--master-addr HOST of node 0",
            )

    @property
    def multi_node(self) -> bool:
        """torchrun's multi-node form (explicit rendezvous) rather than ``--standalone``."""
        return self.launcher == "torchrun" and (self.nodes > 1 or bool(self.master_addr))

    @property
    def tasks_per_node(self) -> int:
        """Processes per node: one per GPU on SLURM when GPUs are requested, else ``nproc_per_node``."""
        if self.launcher == "local":
            return 1
        if self.launcher == "slurm" and self.gpus_per_node > 0:
            return self.gpus_per_node
        return self.nproc_per_node

    @property
    def world_size(self) -> int:
        """Total processes: ``nodes * tasks_per_node``."""
        return self.nodes * self.tasks_per_node


def parse_time_minutes(text: str, path: str | os.PathLike | None = None) -> int:
    """SLURM time limit -> whole minutes (rounded up). Accepts ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``,
    ``D-H:M:S`` (the formats of ``sbatch --time``)."""
    text = str(text).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if match is None:
        raise DinoscopeError(
            f"launch.time {text!r} is not a SLURM time limit",
            path=path,
            field="launch.time",
            fix="use minutes (90), HH:MM:SS (72:00:00) or D-HH:MM:SS (3-00:00:00)",
        )
    days, first, second, third = match.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = int(days) * 86400 + int(first) * 3600 + int(second or 0) * 60 + int(third or 0)
    elif third is not None:  # H:M:S
        seconds = int(first) * 3600 + int(second) * 60 + int(third)
    else:  # M or M:S
        seconds = int(first) * 60 + int(second or 0)
    if seconds <= 0:
        raise DinoscopeError(
            f"launch.time {text!r} is zero", path=path, field="launch.time", fix="give a positive time limit"
        )
    return -(-seconds // 60)


def sbatch_options(lines: list[str], path: str | os.PathLike | None = None) -> dict[str, str | bool]:
    """``["--exclusive", "--mail-type=END"]`` -> ``{"exclusive": True, "mail-type": "END"}`` (``#SBATCH`` optional)."""
    options: dict[str, str | bool] = {}
    for line in lines:
        text = str(line).strip()
        text = text[len("#SBATCH") :].strip() if text.upper().startswith("#SBATCH") else text
        match = _SBATCH_RE.match(text)
        if match is None:
            raise DinoscopeError(
                f"launch.sbatch_extra entry {line!r} is not an sbatch option",
                path=path,
                field="launch.sbatch_extra",
                fix="write each as --key=value or --flag",
            )
        options[match[1]] = match[2] if match[2] is not None else True
    return options


def _quote_times(path: str | os.PathLike | None, overrides: list[str]) -> list[str]:
    """YAML 1.1 reads an unquoted ``72:00:00`` as the base-60 integer 259200; keep SLURM times as written."""
    fixed = []
    if path is not None and Path(path).is_file():
        match = _UNQUOTED_TIME_RE.search(Path(path).read_text())
        if match:
            fixed.append(f'time="{match[1]}"')
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "time" and ":" in value and value[:1] not in "'\"":
            item = f'time="{value}"'
        fixed.append(item)
    return fixed


def load_resources(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> LaunchResources:
    """Strictly load a resource file (optional) and ``key=value`` overrides into :class:`LaunchResources`."""
    try:
        return load_recipe(LaunchResources, path, _quote_times(path, list(overrides or [])))
    except DinoscopeError as err:
        field_name = err.field or ""
        if field_name and not field_name.startswith("launch."):
            field_name = f"launch.{field_name}"
        raise DinoscopeError(
            f"launch resources: {err.message}", path=err.path, field=field_name or None, fix=err.fix
        ) from None
