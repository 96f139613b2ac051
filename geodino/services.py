"""The canopy commands' services: each takes its typed recipe (:mod:`geodino.config`), does the work and reports.

``dinoscope canopy ...`` (declared in :mod:`geodino.cli`) and ``dinoscope launch`` (:mod:`geodino.kinds`) both run
these, so a recipe file and the equivalent flags do exactly the same thing. The signature
``(recipe, options, invocation)`` is the one :mod:`core.cli.adapter` calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from geodino.config import (
    CanopyEvaluateCfg,
    CanopyFitRecipe,
    CanopyInspectCfg,
    CanopyPredictRecipe,
    CanopySynthCfg,
    CanopyZonalCfg,
    FitOptions,
)
from geodino.evaluate import evaluate_rasters
from geodino.fit import fit_canopy
from geodino.inspection import format_report, inspect_raster, report_json
from geodino.prediction import predict_files
from geodino.synthetic import make_forest
from geodino.zonal import zonal_to_file


def synth(cfg: CanopySynthCfg, options: None = None, invocation: Any = None) -> int:
    """Write ``cfg.scenes`` synthetic forests (RGB GeoTIFF + CHM each) and print their paths."""
    for i in range(cfg.scenes):
        for path in make_forest(cfg.out, size=cfg.size, seed=cfg.seed + i, res=cfg.res, crs=cfg.crs):
            print(path)
    return 0


def fit(recipe: CanopyFitRecipe, options: FitOptions | None = None, invocation: Any = None) -> int:
    """Fit a canopy-height head into ``--output-dir`` (or ``train.output_dir``) with a run record; prints the
    validation metrics next to the predict-the-mean baseline. Inputs are checked before anything is written; the
    run directory is locked; a finished fit of another recipe there is refused unless ``--overwrite``."""
    run_dir = Path((options.output_dir if options else "") or recipe.train.output_dir)
    result = fit_canopy(
        recipe,
        run_dir,
        overwrite=bool(options and options.overwrite),
        recipe_path=invocation.recipe_path if invocation else None,
        overrides=list(invocation.overrides) if invocation else [],
    )
    print(json.dumps({k: result[k] for k in ("val", "baseline_train_mean", "best_epoch", "model")}, indent=2))
    return 0


def predict(
    recipe: CanopyPredictRecipe, options: None = None, invocation: Any = None, preview: bool = False
) -> list[Path]:
    """Predict every input of the recipe into COGs; returns the height rasters written (with ``preview``, each also
    gets a PNG: the input RGB beside the heights, with colour and scale bars)."""
    bands = [int(b) if str(b).isdigit() else b for b in recipe.bands] or None
    return predict_files(
        recipe.model,
        recipe.inputs,
        recipe.out,
        uncertainty=recipe.uncertainty,
        tile=recipe.tile,
        overlap=recipe.overlap,
        batch_size=recipe.batch_size,
        out_dtype=recipe.dtype,
        uint16_scale=recipe.uint16_scale,
        bands=bands,
        device=recipe.device,
        num_workers=recipe.num_workers,
        num_heads=recipe.num_heads or None,
        hrch_blocks=list(recipe.hrch_blocks) or None,
        input_range=recipe.input_range,
        input_scale=recipe.input_scale,
        mosaic=recipe.mosaic,
        preview=preview,
        resume=recipe.resume,
        overwrite=recipe.overwrite,
    )


def predict_and_preview(recipe: CanopyPredictRecipe, options: None = None, invocation: Any = None) -> int:
    """:func:`predict` with previews, then print each COG and its PNG preview."""
    for path in predict(recipe, preview=True):
        print(path)
        print(path.with_suffix(".png"))
    return 0


def evaluate(cfg: CanopyEvaluateCfg, options: None = None, invocation: Any = None) -> int:
    """Compare a prediction with a reference CHM into ``cfg.out`` (metrics.json, density plot, previews)."""
    result = evaluate_rasters(
        cfg.pred,
        cfg.ref,
        cfg.out,
        resampling=cfg.resampling,
        block=cfg.block,
        trim=cfg.trim,
        pred_scale=cfg.pred_scale or None,
        ref_scale=cfg.ref_scale or None,
    )
    print(
        f"MAE {result['mae']:.3f} m  RMSE {result['rmse']:.3f} m  R2 {result['r2']:.3f}  "
        f"block R2 {result['block_r2']:.3f}  bias {result['bias']:+.3f} m  n={result['n_pixels']}"
    )
    return 0


def zonal(cfg: CanopyZonalCfg, options: None = None, invocation: Any = None) -> int:
    """Per-plot canopy statistics of ``cfg.raster`` into ``cfg.output``."""
    written = zonal_to_file(
        cfg.raster,
        cfg.polygons,
        cfg.output,
        cover_threshold=cfg.cover_threshold,
        band=cfg.band,
        buffer=cfg.buffer,
        crs=cfg.crs,
        x_column=cfg.x_column,
        y_column=cfg.y_column,
        prefix=cfg.prefix,
    )
    print(written)
    return 0


def inspect(cfg: CanopyInspectCfg, options: None = None, invocation: Any = None) -> int:
    """Print what ``cfg.raster`` holds and, with ``cfg.model``, how ``canopy predict`` would treat it."""
    report = inspect_raster(
        cfg.raster,
        model_path=cfg.model or None,
        bands=[int(b) if str(b).isdigit() else b for b in cfg.bands] or None,
        input_range=cfg.input_range,
        input_scale=cfg.input_scale,
        num_heads=cfg.num_heads or None,
        hrch_blocks=list(cfg.hrch_blocks) or None,
    )
    print(report_json(report) if cfg.json else format_report(report))
    return 0
