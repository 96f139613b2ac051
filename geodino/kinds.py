"""Recipe kinds ``canopy_fit`` and ``canopy_predict``: which geodino service runs each schema.

Registered through the ``dinoscope.recipes`` entry points (``geodino.kinds:canopy_fit_kind``...), so core never
imports geodino and the schema module (``geodino.config``) imports no service.
"""

from __future__ import annotations

from pathlib import Path

from core.launch.kinds import RecipeKind
from geodino.cli_model import predict_files
from geodino.config import CanopyFitRecipe, CanopyPredictRecipe
from geodino.fit import fit_canopy


def _run_fit(recipe: CanopyFitRecipe, run_dir: Path) -> int:
    fit_canopy(recipe, run_dir)
    return 0


def _run_predict(recipe: CanopyPredictRecipe, run_dir: Path) -> int:
    predict_files(
        recipe.model,
        recipe.inputs,
        recipe.out,
        uncertainty=recipe.uncertainty,
        tile=recipe.tile,
        overlap=recipe.overlap,
        batch_size=recipe.batch_size,
        out_dtype=recipe.dtype,
        uint16_scale=recipe.uint16_scale,
        bands=recipe.bands or None,
        device=recipe.device,
        num_workers=recipe.num_workers,
        num_heads=recipe.num_heads or None,
        resume=recipe.resume,
    )
    return 0


CANOPY_FIT = RecipeKind(
    CanopyFitRecipe, _run_fit, "fit a canopy-height head on a frozen backbone (image/CHM pairs)", distributed=False
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
