"""``dinoscope launch RECIPE [key=value ...]``: validate a recipe completely, then run it here, as local processes,
or as a SLURM job (submitit).

    dinoscope launch recipes/tiny/pretrain.yaml                                          # tiny CPU run
    dinoscope launch recipes/cluster/pretrain_vitg14_16nodes.yaml \\
        --resources recipes/launch/slurm_16nodes_8gpus.yaml --account proj --dry-run    # 16 nodes x 8 GPUs
    dinoscope export runs/tiny/pretrain out/backbone.safetensors                          # portable weights

Several machines without SLURM: run the same torchrun command on every node (static rendezvous, one node rank each)

    dinoscope launch RECIPE --launcher torchrun --nodes 2 --nproc 8 --node-rank 0 --master-addr node0   # on node0
    dinoscope launch RECIPE --launcher torchrun --nodes 2 --nproc 8 --node-rank 1 --master-addr node0   # on node1

or let c10d assign the ranks: ``--rdzv-backend c10d --rdzv-endpoint node0:29400`` on every node.

Overrides starting with ``launch.`` go to the launch resources (``launch.qos=high``), the others to the recipe.
Nothing starts and nothing is submitted until the recipe, the resources, the batch-size rule and the input paths
have all been checked.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.launch import LaunchPlan

# CLI flag (argparse dest) -> launch resources key.
_FLAG_KEYS = {
    "launcher": "launcher",
    "nproc": "nproc_per_node",
    "nodes": "nodes",
    "gpus_per_node": "gpus_per_node",
    "partition": "partition",
    "time": "time",
    "account": "account",
    "global_batch_size": "global_batch_size",
    "node_rank": "node_rank",
    "master_addr": "master_addr",
    "master_port": "master_port",
    "rdzv_backend": "rdzv_backend",
    "rdzv_id": "rdzv_id",
}


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """``launch.*`` overrides (prefix removed) and recipe overrides, in their original order."""
    launch, recipe = [], []
    for item in items:
        if item.startswith("launch."):
            launch.append(item[len("launch.") :])
        else:
            recipe.append(item)
    return launch, recipe


def _endpoint_overrides(endpoint: str) -> list[str]:
    """``--rdzv-endpoint HOST:PORT`` -> the ``master_addr`` and ``master_port`` resources it stands for."""
    from core.errors import DinoscopeError

    host, sep, port = endpoint.rpartition(":")
    if not (sep and host and port.isdigit()):
        raise DinoscopeError(
            f"--rdzv-endpoint {endpoint!r} is not HOST:PORT",
            field="launch.master_addr",
            fix="e.g. --rdzv-endpoint node0:29400 (the host of node 0 or of the rendezvous store)",
        )
    return [f'master_addr="{host}"', f"master_port={int(port)}"]


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    # The endpoint comes first so that explicit --master-addr / --master-port flags win over it.
    endpoint = getattr(args, "rdzv_endpoint", None)
    out = _endpoint_overrides(endpoint) if endpoint else []
    for dest, key in _FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            out.append(f'{key}="{value}"' if isinstance(value, str) else f"{key}={value}")
    return out


def _describe(plan: LaunchPlan) -> str:
    """Dry-run text; a missing input path is reported as a warning (the data may live on the cluster only)."""
    from core.errors import DinoscopeError
    from core.launch import check_data_paths

    if plan.resources.launcher == "slurm":
        from core.launch.slurm import describe
    else:
        from core.launch.local import describe
    text = describe(plan)
    try:
        check_data_paths(plan.recipe, plan.recipe_path)
    except DinoscopeError as err:
        text += f"\n\n# WARNING: the launch would fail here: {err}"
    return text


def _wait(job: Any) -> int:
    from core.errors import DinoscopeError

    try:
        return max(int(status or 0) for status in job.results())  # one status per task
    except Exception as err:  # noqa: BLE001 -- submitit re-raises the task's own failure; point at its log
        raise DinoscopeError(
            f"the job failed ({type(err).__name__})", path=job.paths.stderr, fix="read the task log named here"
        ) from None


def cmd_launch(args: argparse.Namespace) -> int:
    from core.launch import plan_launch
    from core.launch.resources import LaunchResources, load_resources

    launch_overrides, recipe_overrides = split_overrides(list(args.overrides))
    if args.worker:  # one rank of a job a launcher started: the parent has validated the launch
        from core.launch.local import run_in_process

        plan = plan_launch(args.recipe, recipe_overrides, LaunchResources(launcher="local"), args.output_dir)
        return run_in_process(plan, record=False)
    resources = load_resources(args.resources, launch_overrides + _flag_overrides(args))
    if args.allow_recipe_change:  # read by every rank's training loop (core.train.session), local or on SLURM
        from core.train.session import ALLOW_CHANGE_ENV

        os.environ[ALLOW_CHANGE_ENV] = "1"
        resources.env[ALLOW_CHANGE_ENV] = "1"
    plan = plan_launch(args.recipe, recipe_overrides, resources, args.output_dir, check_paths=not args.dry_run)
    if args.dry_run:
        print(_describe(plan))
        return 0
    launcher = plan.resources.launcher
    if launcher == "slurm":
        from core.launch import slurm

        job = slurm.submit(plan)
        print(
            f"submitted job {job.job_id} ({plan.world_size} tasks); logs in {job.paths.folder}; "
            f"run directory {plan.run_dir}"
        )
        if plan.resources.cluster == "local":  # a local "cluster" job ends with this command, so wait for it
            return _wait(job)
        return 0
    from core.launch import local

    if launcher == "local":
        return local.run_in_process(plan)
    return local.run_processes(plan)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "launch",
        help="validate a recipe, then run it locally, as N processes or on SLURM",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="YAML recipe (see recipes/README.md)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="key=value recipe overrides, launch.key=value for the resources "
        "(right after RECIPE, before the --options)",
    )
    p.add_argument(
        "--launcher",
        choices=["local", "torchrun", "deepspeed", "slurm"],
        help="local: this process; torchrun/deepspeed: --nproc local processes; slurm: a submitit job",
    )
    p.add_argument("--nproc", type=int, help="processes on this machine (torchrun/deepspeed)")
    p.add_argument(
        "--nodes",
        "--nnodes",
        dest="nodes",
        type=int,
        help="machines: SLURM nodes, or torchrun nodes each running this same command",
    )
    p.add_argument("--node-rank", type=int, help="torchrun on several nodes (static): this machine's index, 0..N-1")
    p.add_argument("--master-addr", help="torchrun on several nodes: host of node 0 (of the c10d store)")
    p.add_argument("--master-port", type=int, help="rendezvous port (torchrun default 29500 across nodes)")
    p.add_argument(
        "--rdzv-backend",
        choices=["static", "c10d"],
        help="torchrun rendezvous on several nodes: static (--node-rank per machine) or c10d",
    )
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="sets --master-addr and --master-port at once")
    p.add_argument("--rdzv-id", help="c10d job id shared by every node (default: derived from the run directory)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per SLURM node (one task each)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--time", help="SLURM time limit, e.g. 72:00:00")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--global-batch-size", type=int, help="require train.batch_size_per_rank x world size to equal this")
    p.add_argument("--resources", help="launch resources file (recipes/launch/*.yaml)")
    p.add_argument("--output-dir", help="run directory (default: the recipe's train.output_dir)")
    p.add_argument(
        "--allow-recipe-change",
        action="store_true",
        help="resume although the recipe differs from the checkpoint's (recorded in recipe_changes.jsonl)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the job (sbatch script, submitit parameters, commands) without starting it",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # what each launched rank runs
    p.set_defaults(func=cmd_launch)
