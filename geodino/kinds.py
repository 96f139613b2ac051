"""Recipe kinds ``canopy_fit`` and ``canopy_predict``: which geodino service runs each schema.

Registered through the ``dinoscope.recipes`` entry points (``geodino.kinds:canopy_fit_kind``...), so core never
imports geodino and the schema module (``geodino.config``) imports no service.
"""

from __future__ import annotations

from pathlib import Path

from core.launch.kinds import RecipeKind
from geodino import services
from geodino.config import CanopyFitRecipe, CanopyPredictRecipe
from geodino.fit import fit_canopy


def _run_fit(recipe: CanopyFitRecipe, run_dir: Path) -> int:
    fit_canopy(recipe, run_dir)
    return 0


def _run_predict(recipe: CanopyPredictRecipe, run_dir: Path) -> int:
    services.predict(recipe)
    return 0


CANOPY_FIT = RecipeKind(
    CanopyFitRecipe,
    _run_fit,
    "fit a canopy-height head on a frozen backbone (image/CHM pairs)",
    distributed=False,
    owns_run_dir=True,  # fit_canopy checks its inputs, then locks the run directory and writes config.yaml itself
)
CANOPY_PREDICT = RecipeKind(
    CanopyPredictRecipe, _run_predict, "tiled canopy-height prediction into COGs", distributed=True
)


def canopy_fit_kind() -> RecipeKind:
    """Entry point ``dinoscope.recipes: canopy_fit``."""
    return CANOPY_FIT


def canopy_predict_kind() -> RecipeKind:
    """Entry point ``dinoscope.recipes: canopy_predict``."""
    return CANOPY_PREDICT
