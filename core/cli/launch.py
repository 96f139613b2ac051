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

import os
from typing import Any

from core.cli.adapter import Invocation
from core.config.commands import ALLOW_CHANGE_ENV, LaunchOptions
from core.config.loader import to_yaml
from core.errors import DinoscopeError
from core.launch import LaunchPlan, check_data_paths, local, plan_launch, slurm
from core.launch.resources import LaunchResources, load_resources


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
    host, sep, port = endpoint.rpartition(":")
    if not (sep and host and port.isdigit()):
        raise DinoscopeError(
            f"--rdzv-endpoint {endpoint!r} is not HOST:PORT",
            field="launch.master_addr",
            fix="e.g. --rdzv-endpoint node0:29400 (the host of node 0 or of the rendezvous store)",
        )
    return [f'master_addr="{host}"', f"master_port={int(port)}"]


def _describe(plan: LaunchPlan) -> str:
    """Dry-run text; a missing input path is reported as a warning (the data may live on the cluster only)."""
    text = (slurm if plan.resources.launcher == "slurm" else local).describe(plan)
    try:
        check_data_paths(plan.recipe, plan.recipe_path)
    except DinoscopeError as err:
        text += f"\n\n# WARNING: the launch would fail here: {err}"
    return text


def _wait(job: Any) -> int:
    try:
        return max(int(status or 0) for status in job.results())  # one status per task
    except Exception as err:  # noqa: BLE001 -- submitit re-raises the task's own failure; point at its log
        raise DinoscopeError(
            f"the job failed ({type(err).__name__})", path=job.paths.stderr, fix="read the task log named here"
        ) from None


def run_launch(recipe: None, options: LaunchOptions, invocation: Invocation) -> int:
    """Validate the launch completely (recipe of any kind, resources, world size, batch size, input paths), then run
    it here, as local processes, or submit it to SLURM; ``--dry-run`` prints the job instead."""
    launch_overrides, recipe_overrides = split_overrides(invocation.overrides)
    if not invocation.recipe_path:
        raise DinoscopeError("no recipe given", field="RECIPE", fix="dinoscope launch recipes/tiny/pretrain.yaml")
    if options.worker:  # one rank of a job a launcher started: the parent has validated the launch
        plan = plan_launch(
            invocation.recipe_path, recipe_overrides, LaunchResources(launcher="local"), options.output_dir or None
        )
        return local.run_in_process(plan, record=False)
    # The endpoint comes first so that explicit --master-addr / --master-port flags win over it.
    endpoint = _endpoint_overrides(options.rdzv_endpoint) if options.rdzv_endpoint else []
    resources = load_resources(options.resources or None, endpoint + launch_overrides)
    if options.allow_recipe_change:  # read by every rank's training loop (core.train.session), local or on SLURM
        os.environ[ALLOW_CHANGE_ENV] = "1"
        resources.env[ALLOW_CHANGE_ENV] = "1"
    checks = not (options.dry_run or invocation.print_recipe)
    plan = plan_launch(
        invocation.recipe_path, recipe_overrides, resources, options.output_dir or None, check_paths=checks
    )
    if invocation.print_recipe:
        print(f"{to_yaml(plan.recipe)}launch:\n" + "".join(f"  {line}\n" for line in to_yaml(resources).splitlines()))
        return 0
    if options.dry_run:
        print(_describe(plan))
        return 0
    launcher = plan.resources.launcher
    if launcher == "slurm":
        job = slurm.submit(plan)
        print(
            f"submitted job {job.job_id} ({plan.world_size} tasks); logs in {job.paths.folder}; "
            f"run directory {plan.run_dir}"
        )
        if plan.resources.cluster == "local":  # a local "cluster" job ends with this command, so wait for it
            return _wait(job)
        return 0
    if launcher == "local":
        return local.run_in_process(plan)
    return local.run_processes(plan)
