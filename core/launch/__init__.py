"""Launching a recipe: validate everything first, then run it in-process, as local processes, or on SLURM.

    dinoscope launch recipes/tiny/pretrain.yaml                                   # one process (laptop / CI)
    dinoscope launch recipes/tiny/pretrain.yaml --launcher torchrun --nproc 2 dist.strategy=deepspeed
    dinoscope launch recipes/cluster/pretrain_vitg14_16nodes.yaml \\
        --resources recipes/launch/slurm_16nodes_8gpus.yaml --dry-run              # print the job, submit nothing

:func:`plan_launch` does every check that can be done before a process starts or a job is queued: the recipe
(its kind's strict schema and ``validate``), the launch resources, the batch-size rule and the existence of the
input paths. :mod:`core.launch.local` and :mod:`core.launch.slurm` then carry the plan out. Cluster specifics stay
here and in ``recipes/launch/``; ``core/train`` knows nothing about them (style.md §6.1).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.config.fields import DATASET_PARAMS_OF, INPUT_PATH, walk_fields
from core.config.loader import load_recipe
from core.distributed.layout import DistEnv
from core.errors import DinoscopeError
from core.launch.kinds import get_kind, recipe_kind_of
from core.launch.resources import LaunchResources, load_resources

__all__ = [
    "LaunchPlan",
    "LaunchResources",
    "check_batch_size",
    "check_data_paths",
    "input_paths",
    "load_resources",
    "plan_launch",
    "resolve_run_dir",
]


@dataclasses.dataclass
class LaunchPlan:
    """A validated launch: what runs, where, and with how many processes.

    Attributes:
        recipe_path: the recipe file.
        overrides: the recipe's ``key=value`` overrides (without the ``launch.*`` ones).
        kind_name: the recipe's ``kind:``.
        recipe: the resolved recipe (an instance of the kind's schema).
        resources: the resolved launch resources.
        run_dir: where the run writes (and resumes from).
        world_size: number of training processes.
    """

    recipe_path: Path
    overrides: list[str]
    kind_name: str
    recipe: Any
    resources: LaunchResources
    run_dir: Path
    world_size: int

    @property
    def kind(self) -> Any:
        """The :class:`~core.launch.kinds.RecipeKind` named ``kind_name`` (its schema and ``run``)."""
        return get_kind(self.kind_name, self.recipe_path)


def input_paths(recipe: Any) -> list[tuple[str, str]]:
    """``(recipe key, path)`` of every input a recipe names, as its schema declares them.

    Two declarations count (:mod:`core.config.fields`): fields marked :func:`~core.config.fields.input_path` (a
    string, or lists of strings), and, in a :func:`~core.config.fields.dataset_params` dict, the keyword arguments
    that the dataset kind lists in its factory's ``input_params``. Key names mean nothing: an undeclared key is never
    checked, whatever it is called. Empty values and URLs are skipped.

    Raises:
        DinoscopeError: a dataset kind that is unknown or cannot be imported (its inputs cannot be known).
    """
    found: list[tuple[str, str]] = []
    for ref in walk_fields(recipe):
        if ref.metadata.get(INPUT_PATH):
            found += [(ref.key, path) for path in _paths(ref.value)]
        kind_field = ref.metadata.get(DATASET_PARAMS_OF)
        if kind_field and isinstance(ref.value, Mapping):
            prefix = ref.key.rpartition(".")[0]
            kind_key = f"{prefix}.{kind_field}" if prefix else kind_field
            for name in _dataset_input_params(getattr(ref.owner, kind_field), kind_key):
                found += [(f"{ref.key}.{name}", path) for path in _paths(ref.value.get(name))]
    return found


def _paths(value: Any) -> list[str]:
    """The non-empty, non-URL strings in a value (a path, or lists of them at any depth)."""
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        return [text] if text and "://" not in text else []
    if isinstance(value, (list, tuple)):
        return [path for item in value for path in _paths(item)]
    return []


def _dataset_input_params(kind: str, kind_key: str) -> tuple[str, ...]:
    """The keyword arguments of dataset kind ``kind`` that name input paths (its factory's ``input_params``)."""
    # deferred: core.data.datasets loads torch; launch planning stays torch-free (tests/core/test_launch.py)
    from core.data.datasets import dataset_kinds

    kinds = dataset_kinds()
    if kind not in kinds:
        raise DinoscopeError(f"unknown dataset kind {kind!r}", field=kind_key, fix=f"use one of {sorted(kinds)}")
    factory = kinds[kind]
    if not callable(factory) and hasattr(factory, "load"):  # an entry point (duck-typed: backports differ)
        try:
            factory = factory.load()
        except ImportError as err:
            raise DinoscopeError(
                f"the dataset kind {kind!r} could not be imported ({err})",
                field=kind_key,
                fix=f"install the package that provides {factory.value}",
            ) from None
    return tuple(getattr(factory, "input_params", ()))


def check_data_paths(recipe: Any, recipe_path: str | os.PathLike | None = None) -> None:
    """Fail, naming the recipe key and every missing path, if an input the recipe names does not exist.

    Kept apart from recipe validation so that recipes validate on machines without the data (tests, laptops);
    ``dinoscope launch`` runs it before starting anything. Glob patterns must match at least one file.
    """
    missing = []
    for key, value in input_paths(recipe):
        expanded = os.path.expanduser(value)
        exists = bool(glob.glob(expanded)) if any(ch in expanded for ch in "*?[") else Path(expanded).exists()
        if not exists:
            missing.append((key, value))
    if missing:
        key, value = missing[0]
        others = "; also missing: " + ", ".join(f"{k}={v}" for k, v in missing[1:]) if len(missing) > 1 else ""
        raise DinoscopeError(
            f"data path {value!r} does not exist{others}",
            path=value,
            field=key,
            fix=f"create it, or point {key} at existing data ({key}=... on the command line); "
            f"relative paths are resolved from {os.getcwd()}",
        )


def check_batch_size(
    recipe: Any, world_size: int, global_batch_size: int = 0, recipe_path: str | os.PathLike | None = None
) -> None:
    """With a global batch size given, require ``train.batch_size_per_rank * world_size == global_batch_size``.

    A global batch the world size does not divide is rejected with the nearest valid sizes; a divisible one that the
    per-rank batch does not produce names the per-rank value to use. Without a global batch nothing is checked.
    """
    if not global_batch_size:
        return
    train = getattr(recipe, "train", None)
    per_rank = getattr(train, "batch_size_per_rank", None)
    if per_rank is None:
        raise DinoscopeError(
            "a global batch size was given, but this recipe kind has no train.batch_size_per_rank",
            path=recipe_path,
            field="launch.global_batch_size",
            fix="remove the global batch size",
        )
    if global_batch_size % world_size:
        lower = global_batch_size - global_batch_size % world_size
        raise DinoscopeError(
            f"global batch size {global_batch_size} is not divisible by the world size {world_size}",
            path=recipe_path,
            field="launch.global_batch_size",
            fix=f"use a multiple of {world_size} (e.g. {lower or world_size} or "
            f"{lower + world_size}), or change the number of nodes/processes",
        )
    if per_rank * world_size != global_batch_size:
        raise DinoscopeError(
            f"train.batch_size_per_rank {per_rank} x world size {world_size} = "
            f"{per_rank * world_size}, not the global batch size {global_batch_size}",
            path=recipe_path,
            field="train.batch_size_per_rank",
            fix=f"set train.batch_size_per_rank={global_batch_size // world_size}",
        )


# Where recipe kinds keep their run directory, first match wins (schemas can be exact with a ``run_dir()`` method).
_RUN_DIR_KEYS = ("train.output_dir", "output_dir", "output.dir", "output.output_dir")


def resolve_run_dir(
    recipe: Any, kind_name: str, recipe_path: str | os.PathLike, output_dir: str | os.PathLike | None = None
) -> Path:
    """``output_dir`` if given, else the schema's ``run_dir()``, else the first of ``train.output_dir``,
    ``output_dir``, ``output.dir`` the recipe has, else ``runs/<kind>/<recipe name>``."""
    if output_dir:
        return Path(output_dir)
    own = getattr(recipe, "run_dir", None)
    if callable(own):
        return Path(own())
    for dotted in _RUN_DIR_KEYS:
        value: Any = recipe
        for part in dotted.split("."):
            value = getattr(value, part, None)
        if isinstance(value, str) and value:
            return Path(value)
    return Path("runs") / kind_name / Path(recipe_path).stem


def _world_size_from_environment() -> int:
    """World size of an externally started job (``launch --launcher local`` under torchrun or srun), else 1."""
    return DistEnv.from_environ().world_size


def plan_launch(
    recipe_path: str | os.PathLike,
    overrides: list[str] | None = None,
    resources: LaunchResources | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    check_paths: bool = True,
) -> LaunchPlan:
    """Validate a launch completely (recipe, resources, world size, batch size, input paths) and return its plan.

    Raises:
        DinoscopeError: naming the file, the key and the fix for the first problem found.
    """
    path = Path(recipe_path)
    kind_name = recipe_kind_of(path)
    kind = get_kind(kind_name, path)
    recipe = load_recipe(kind.schema, path, list(overrides or []))
    resources = resources if resources is not None else LaunchResources()
    resources.validate()
    world_size = resources.world_size if resources.launcher != "local" else _world_size_from_environment()
    if world_size > 1 and not kind.distributed:
        raise DinoscopeError(
            f"recipe kind {kind_name!r} runs as a single process, but the launch asks for {world_size}",
            path=path,
            field="launch.launcher",
            fix="use --launcher local (one process)",
        )
    check_batch_size(recipe, world_size, resources.global_batch_size, path)
    if check_paths:
        check_data_paths(recipe, path)
    run_dir = resolve_run_dir(recipe, kind_name, path, output_dir)
    return LaunchPlan(
        recipe_path=path,
        overrides=list(overrides or []),
        kind_name=kind_name,
        recipe=recipe,
        resources=resources,
        run_dir=run_dir,
        world_size=world_size,
    )
