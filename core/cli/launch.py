"""``dinoscope launch RECIPE [key=value ...]``: validate a recipe completely, then run it here, as local processes,
or as a SLURM job (submitit).

    dinoscope launch recipes/tiny/pretrain.yaml                                          # tiny CPU run
    dinoscope launch recipes/cluster/pretrain_vitg14_zero3_16nodes.yaml \\
        --resources recipes/launch/slurm_16nodes_8gpus.yaml --account proj --dry-run    # 16 nodes x 8 GPUs
    dinoscope export runs/tiny/pretrain out/backbone.safetensors                          # portable weights

Overrides starting with ``launch.`` go to the launch resources (``launch.qos=high``), the others to the recipe.
Nothing starts and nothing is submitted until the recipe, the resources, the batch-size rule and the input paths
have all been checked.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.launch import LaunchPlan

# CLI flag (argparse dest) -> launch resources key.
_FLAG_KEYS = {"launcher": "launcher", "nproc": "nproc_per_node", "nodes": "nodes", "gpus_per_node": "gpus_per_node",
              "partition": "partition", "time": "time", "account": "account",
              "global_batch_size": "global_batch_size"}


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """``launch.*`` overrides (prefix removed) and recipe overrides, in their original order."""
    launch, recipe = [], []
    for item in items:
        if item.startswith("launch."):
            launch.append(item[len("launch."):])
        else:
            recipe.append(item)
    return launch, recipe


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    out = []
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
    except Exception as err:  # submitit re-raises the task's failure with its log; point at the log instead
        raise DinoscopeError(f"the job failed ({type(err).__name__})", path=job.paths.stderr,
                             fix="read the task log named here") from None


def cmd_launch(args: argparse.Namespace) -> int:
    from core.launch import plan_launch
    from core.launch.resources import LaunchResources, load_resources

    launch_overrides, recipe_overrides = split_overrides(list(args.overrides))
    if args.worker:  # one rank of a job a launcher started: the parent has validated the launch
        from core.launch.local import run_in_process

        plan = plan_launch(args.recipe, recipe_overrides, LaunchResources(launcher="local"), args.output_dir)
        return run_in_process(plan, record=False)
    resources = load_resources(args.resources, launch_overrides + _flag_overrides(args))
    plan = plan_launch(args.recipe, recipe_overrides, resources, args.output_dir, check_paths=not args.dry_run)
    if args.dry_run:
        print(_describe(plan))
        return 0
    launcher = plan.resources.launcher
    if launcher == "slurm":
        from core.launch import slurm

        job = slurm.submit(plan)
        print(f"submitted job {job.job_id} ({plan.world_size} tasks); logs in {job.paths.folder}; "
              f"run directory {plan.run_dir}")
        if plan.resources.cluster == "local":  # a local "cluster" job ends with this command, so wait for it
            return _wait(job)
        return 0
    from core.launch import local

    if launcher == "local":
        return local.run_in_process(plan)
    return local.run_processes(plan)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("launch", help="validate a recipe, then run it locally, as N processes or on SLURM",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="YAML recipe (see recipes/README.md)")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides, launch.key=value for the resources "
                   "(right after RECIPE, before the --options)")
    p.add_argument("--launcher", choices=["local", "torchrun", "deepspeed", "slurm"],
                   help="local: this process; torchrun/deepspeed: --nproc local processes; slurm: a submitit job")
    p.add_argument("--nproc", type=int, help="processes on this machine (torchrun/deepspeed)")
    p.add_argument("--nodes", type=int, help="SLURM nodes")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per SLURM node (one task each)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--time", help="SLURM time limit, e.g. 72:00:00")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--global-batch-size", type=int,
                   help="require train.batch_size_per_rank x world size to equal this")
    p.add_argument("--resources", help="launch resources file (recipes/launch/*.yaml)")
    p.add_argument("--output-dir", help="run directory (default: the recipe's train.output_dir)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the job (sbatch script, submitit parameters, commands) without starting it")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # what each launched rank runs
    p.set_defaults(func=cmd_launch)
