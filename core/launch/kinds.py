"""Recipe kinds: the ``kind:`` key of a recipe names its schema and the function that runs it.

Core kinds are listed in :data:`CORE_KINDS`; domain packages add theirs through the entry-point group
``dinoscope.recipes`` (``name = "package.module:OBJECT"`` where ``OBJECT`` is a :class:`RecipeKind`), so ``core``
never imports them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import yaml

from core.config.pretrain import PretrainRecipe
from core.errors import DinoscopeError

ENTRY_POINT_GROUP = "dinoscope.recipes"


@dataclasses.dataclass(frozen=True)
class RecipeKind:
    """A recipe kind.

    Attributes:
        schema: the dataclass a recipe of this kind is merged into (strict).
        run: ``run(recipe, run_dir) -> exit status``; runs in every rank of a multi-process launch.
        help: one line for ``dinoscope launch --help`` and the recipes README.
        distributed: whether several processes make sense for this kind.
        owns_run_dir: ``run`` locks the run directory and writes ``config.yaml`` / ``run_info.json`` itself, after
            its own checks (training does, so that a second launch cannot overwrite the first one's files).
    """

    schema: type
    run: Callable[[Any, Path], int]
    help: str = ""
    distributed: bool = True
    owns_run_dir: bool = False


def _run_pretrain(recipe: Any, run_dir: Path) -> int:
    # deferred: torch and the training stack load only for a run; launch planning stays torch-free (a recipe
    # typo fails in < 2 s, tests/core/test_launch.py)
    from core.eval.periodic import periodic_knn
    from core.train.loop import train

    train(recipe, run_dir, evaluator=periodic_knn(recipe, run_dir))
    return 0


CORE_KINDS: dict[str, Callable[[], RecipeKind]] = {
    "pretrain": lambda: RecipeKind(
        PretrainRecipe, _run_pretrain, "DINOv2 SSL pretraining (EMA teacher)", owns_run_dir=True
    ),
    "distill": lambda: RecipeKind(
        PretrainRecipe,
        _run_pretrain,
        "DINOv2 distillation from a frozen pretrained teacher (distill.teacher_weights)",
        owns_run_dir=True,
    ),
}


def recipe_kinds() -> dict[str, Callable[[], RecipeKind]]:
    """Kind name -> factory of its :class:`RecipeKind`: :data:`CORE_KINDS`, then the ``dinoscope.recipes``
    entry points (a core name wins).
    """
    kinds: dict[str, Callable[[], RecipeKind]] = dict(CORE_KINDS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        kinds.setdefault(ep.name, lambda ep=ep: _as_kind(ep.load()))
    return kinds


def _as_kind(obj: Any) -> RecipeKind:
    """Entry points name either a RecipeKind or a zero-argument callable returning one (cheap to import)."""
    return obj if isinstance(obj, RecipeKind) else obj()


def get_kind(name: str, path: str | os.PathLike | None = None) -> RecipeKind:
    """The :class:`RecipeKind` named ``name``; otherwise a ``DinoscopeError`` that lists the known kinds."""
    kinds = recipe_kinds()
    if name not in kinds:
        raise DinoscopeError(
            f"unknown recipe kind {name!r}", path=path, field="kind", fix=f"use one of {sorted(kinds)}"
        )
    return kinds[name]()


def recipe_kind_of(path: str | os.PathLike) -> str:
    """The ``kind:`` of a recipe file (``pretrain`` when absent)."""
    path = Path(path)
    if not path.exists():
        raise DinoscopeError("recipe not found", path=path, fix="check the path (recipes live under recipes/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise DinoscopeError(f"the recipe is not valid YAML ({err})", path=path) from None
    kind = data.get("kind", "pretrain") if isinstance(data, dict) else "pretrain"
    return str(kind)
