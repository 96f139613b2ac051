"""SLURM through submitit: the job callable, its rendezvous and requeue, the sbatch parameters and the dry run.

The job has one task per GPU (``--ntasks-per-node = gpus_per_node``). Every task unpickles the same
:class:`TrainingJob` and, before training, exports the torchrun-style rendezvous variables computed from the SLURM
environment by :mod:`core.distributed.env`: ``MASTER_ADDR`` = first host of ``SLURM_JOB_NODELIST``, ``MASTER_PORT``
derived from ``SLURM_JOB_ID`` (so every task agrees and concurrent jobs differ), ``RANK``/``LOCAL_RANK``/
``WORLD_SIZE`` from ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS``. It then runs the recipe kind's ``run``
in-process.

Pre-emption and time limits: SLURM signals the job ``signal_delay_s`` seconds before it is stopped (USR2) and sends
SIGTERM before SIGKILL on pre-emption. The training loop records the signal, finishes the current iteration, saves a
checkpoint at that iteration on every rank (``core.train.preemption``), and then hands USR2 to submitit's handler,
which calls :meth:`TrainingJob.checkpoint`; that returns a ``DelayedSubmission`` of the *same* callable and submitit
requeues the job. The requeued job resumes from ``checkpoints/latest``, i.e. from the very iteration reached: no
work is repeated, and it may run on another number of nodes (the checkpoint is resharded). ``launch.requeue: false``
turns requeueing off (the run still saves and stops).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.distributed.layout import DEFAULT_MASTER_ADDR, DistEnv
from core.errors import DinoscopeError
from core.launch import LaunchPlan, plan_launch
from core.launch.local import run_in_process, write_launch_record
from core.launch.resources import LaunchResources, parse_time_minutes, sbatch_options
from core.logging import setup_logging

# Variables a stale submitting shell may carry into srun's environment; the task's own layout must win.
TORCH_RENDEZVOUS_KEYS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "LOCAL_SIZE",
    "CROSS_RANK",
    "CROSS_SIZE",
)
LOCAL_EXECUTOR_TIMEOUT_MIN = 60  # submitit's local executor otherwise stops a job after 2 minutes


def rendezvous_environ(environ: Mapping[str, str], master_port: int = 0) -> dict[str, str]:
    """torchrun-style rendezvous variables for this task, from SLURM (or submitit's local executor) variables.

    Args:
        environ: the task's environment.
        master_port: fixed rendezvous port; 0 derives it from the job id.
    """
    if "SLURM_PROCID" in environ:
        layout = DistEnv.from_environ({k: v for k, v in environ.items() if k not in TORCH_RENDEZVOUS_KEYS})
    elif "SUBMITIT_LOCAL_GLOBALID" in environ:
        # submitit's local executor: one node, this machine; translated to SLURM terms so the port is derived the
        # same way from the job id.
        layout = DistEnv.from_environ(
            {
                "SLURM_PROCID": environ["SUBMITIT_LOCAL_GLOBALID"],
                "SLURM_LOCALID": environ.get("SUBMITIT_LOCAL_LOCALID", "0"),
                "SLURM_NTASKS": environ.get("SUBMITIT_LOCAL_NTASKS", "1"),
                "SLURM_NNODES": "1",
                "SLURM_NODELIST": DEFAULT_MASTER_ADDR,
                "SLURM_JOB_ID": environ.get("SUBMITIT_LOCAL_JOB_ID", ""),
            }
        )
    else:
        layout = DistEnv()
    if master_port:
        layout = dataclasses.replace(layout, master_port=master_port)
    return {
        "MASTER_ADDR": layout.master_addr,
        "MASTER_PORT": str(layout.master_port),
        "RANK": str(layout.rank),
        "LOCAL_RANK": str(layout.local_rank),
        "WORLD_SIZE": str(layout.world_size),
        "LOCAL_WORLD_SIZE": str(layout.local_world_size),
        "GROUP_RANK": str(layout.node_rank),
    }


@dataclasses.dataclass
class TrainingJob:
    """What every SLURM task runs (pickled by submitit): rendezvous from the environment, then the recipe's run.

    Attributes:
        recipe_path: absolute path of the recipe.
        overrides: recipe ``key=value`` overrides.
        run_dir: absolute run directory (training resumes from its latest checkpoint).
        workdir: directory relative data paths are resolved from (where ``dinoscope launch`` was called).
        env: extra environment variables (``launch.env``).
        master_port: fixed rendezvous port, 0 = derived from the job id.
        requeue: whether :meth:`checkpoint` asks submitit to requeue the job.
    """

    recipe_path: str
    overrides: list[str]
    run_dir: str
    workdir: str
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    master_port: int = 0
    requeue: bool = True

    def __call__(self) -> int:
        setup_logging()
        os.chdir(self.workdir)
        os.environ.update(self.env)
        os.environ.update(rendezvous_environ(os.environ, self.master_port))
        plan = plan_launch(self.recipe_path, self.overrides, LaunchResources(launcher="local"), self.run_dir)
        return run_in_process(plan, record=False)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on pre-emption or timeout, after the loop saved its state: requeue this same
        callable (it resumes from the run directory's latest checkpoint)."""
        if not self.requeue:
            return None
        from submitit.helpers import DelayedSubmission  # deferred: optional extra [cluster], SLURM jobs only

        return DelayedSubmission(self, *args, **kwargs)

    def equivalent_command(self) -> str:
        """The shell command each task's work is equivalent to (for dry runs and logs)."""
        return shlex.join(
            [
                sys.executable,
                "-m",
                "core.cli",
                "launch",
                self.recipe_path,
                *self.overrides,
                "--worker",
                "--output-dir",
                self.run_dir,
            ]
        )


def training_job(plan: LaunchPlan) -> TrainingJob:
    """The picklable :class:`TrainingJob` of ``plan``: absolute paths, this directory as ``workdir``."""
    return TrainingJob(
        recipe_path=str(plan.recipe_path.resolve()),
        overrides=list(plan.overrides),
        run_dir=str(plan.run_dir.resolve()),
        workdir=os.getcwd(),
        env=dict(plan.resources.env),
        master_port=plan.resources.master_port,
        requeue=plan.resources.requeue,
    )


def slurm_parameters(resources: LaunchResources) -> dict[str, Any]:
    """sbatch parameters (submitit's ``SlurmExecutor`` names) for the resources."""
    res = resources
    params: dict[str, Any] = {
        "job_name": res.job_name,
        "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node,
        "signal_delay_s": res.signal_delay_s,
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.cpus_per_task:
        params["cpus_per_task"] = res.cpus_per_task
    if res.time:
        params["time"] = parse_time_minutes(res.time)
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(res, key):
            params[key] = getattr(res, key)
    extra = sbatch_options(list(res.sbatch_extra))
    if res.requeue:
        extra.setdefault("requeue", True)
    if extra:
        params["additional_parameters"] = extra
    setup = [f"export {k}={shlex.quote(str(v))}" for k, v in res.env.items()] + list(res.setup)
    if setup:
        params["setup"] = setup
    return params


_GENERIC = {
    "job_name": "name",
    "nodes": "nodes",
    "ntasks_per_node": "tasks_per_node",
    "gpus_per_node": "gpus_per_node",
    "cpus_per_task": "cpus_per_task",
    "time": "timeout_min",
}


def executor_parameters(resources: LaunchResources) -> dict[str, Any]:
    """``AutoExecutor.update_parameters`` keywords: generic names where submitit has them, ``slurm_*`` otherwise."""
    native = slurm_parameters(resources)
    params = {_GENERIC.get(k, f"slurm_{k}"): v for k, v in native.items()}
    if resources.cluster == "local":
        params.setdefault("timeout_min", LOCAL_EXECUTOR_TIMEOUT_MIN)
        if resources.setup:
            params["local_setup"] = list(resources.setup)
    return params


def submitit_folder(plan: LaunchPlan) -> Path:
    """Where submitit keeps pickles and per-task logs; ``%j`` becomes the job id."""
    base = Path(plan.resources.submitit_dir) if plan.resources.submitit_dir else plan.run_dir / "submitit"
    return base.resolve() / "%j"


def _import_submitit() -> Any:
    try:
        import submitit  # deferred: optional extra [cluster], SLURM jobs only
    except ImportError as err:
        raise DinoscopeError(
            f"launcher 'slurm' needs the submitit package ({err})",
            field="launch.launcher",
            fix="pip install 'dinoscope[cluster]'",
        ) from None
    return submitit


def submit(plan: LaunchPlan) -> Any:
    """Submit the plan as one submitit job (``cluster: slurm`` or ``local``); returns the submitit ``Job``."""
    submitit = _import_submitit()
    params = executor_parameters(plan.resources)
    folder = submitit_folder(plan)
    try:
        executor = submitit.AutoExecutor(
            folder=folder,
            cluster=plan.resources.cluster,
            slurm_max_num_timeout=plan.resources.max_timeout_requeues,
            local_max_num_timeout=plan.resources.max_timeout_requeues,
        )
        executor.update_parameters(**params)
    except (RuntimeError, ValueError, NameError, AssertionError) as err:
        raise DinoscopeError(
            f"submitit rejected the job ({err})",
            field="launch",
            fix="check the resources; on a machine without SLURM use launch.cluster=local",
        ) from None
    job_fn = training_job(plan)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    job = executor.submit(job_fn)
    write_launch_record(
        plan,
        job_fn.equivalent_command(),
        {"job_id": str(job.job_id), "submitit_dir": str(folder), "executor_parameters": params},
    )
    return job


def sbatch_script(plan: LaunchPlan) -> str:
    """The sbatch script submitit would write for this plan (submitit's own generator, so it is exact)."""
    _import_submitit()  # a clear error if it is missing
    from submitit.slurm.slurm import _make_sbatch_string  # deferred: optional extra [cluster], SLURM jobs only

    folder = submitit_folder(plan)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(plan.resources))


def describe(plan: LaunchPlan) -> str:
    """Dry-run text: submitit parameters, the sbatch script, the rendezvous and the command each task runs."""
    res = plan.resources
    job_fn = training_job(plan)
    nodelist = "$SLURM_JOB_NODELIST"
    port = str(res.master_port) if res.master_port else "20000 + $SLURM_JOB_ID % 20000"
    batch = getattr(getattr(plan.recipe, "train", None), "batch_size_per_rank", None)
    lines = [
        "# dinoscope launch --dry-run: nothing was submitted",
        f"recipe:      {plan.recipe_path} (kind {plan.kind_name})",
        f"run dir:     {job_fn.run_dir} (a requeued job resumes from its latest checkpoint)",
        f"world size:  {plan.world_size} = {res.nodes} nodes x {res.tasks_per_node} tasks per node"
        + (" (one task per GPU)" if res.gpus_per_node else ""),
    ]
    if batch is not None:
        lines.append(f"batch:       {batch} per rank x {plan.world_size} ranks = {batch * plan.world_size} global")
    lines += [
        "",
        f"# submitit.AutoExecutor(cluster={res.cluster!r}).update_parameters(**):",
        json.dumps(executor_parameters(res), indent=2, default=str),
    ]
    if res.cluster == "slurm":
        lines += ["", "# sbatch script:", sbatch_script(plan)]
    lines += [
        "# rendezvous, exported in every task before training (core.launch.slurm.rendezvous_environ):",
        f"MASTER_ADDR=<first host of {nodelist}>",
        f"MASTER_PORT={port}",
        "RANK=$SLURM_PROCID",
        "LOCAL_RANK=$SLURM_LOCALID",
        f"WORLD_SIZE=$SLURM_NTASKS  # {plan.world_size}",
        f"LOCAL_WORLD_SIZE={res.tasks_per_node}",
        "GROUP_RANK=$SLURM_NODEID",
        "",
        "# each task runs the pickled TrainingJob, equivalent to:",
        f"cd {shlex.quote(job_fn.workdir)} && {job_fn.equivalent_command()}",
        "",
        f"# pre-emption: requeue={'on' if res.requeue else 'off'}; USR2 {res.signal_delay_s} s before the "
        + "limit (or SIGTERM) -> checkpoint at the iteration reached -> TrainingJob.checkpoint() -> requeued, "
        + "resumes from checkpoints/latest",
    ]
    return "\n".join(lines)
