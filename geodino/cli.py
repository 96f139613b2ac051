"""``dinoscope canopy ...``: the canopy sub-commands, declared once each from their schemas (:mod:`geodino.config`)
and run by :mod:`geodino.services`. :mod:`core.cli.adapter` builds the parsers, so every sub-command also takes
``--recipe FILE``, ``--set``, trailing ``key=value`` overrides and ``--print-recipe``.

    dinoscope canopy synth data/forest --scenes 4
    dinoscope canopy fit recipes/tiny/canopy_fit.yaml optim.epochs=20
    dinoscope canopy predict --model runs/tiny/canopy_fit/model.safetensors scene.tif --out scene_chm.tif
    dinoscope canopy evaluate scene_chm.tif lidar_chm.tif --out eval/
    dinoscope canopy zonal scene_chm.tif plots.gpkg plots_stats.gpkg
    dinoscope canopy inspect tile.tif --model model.safetensors
"""

from __future__ import annotations

import argparse

from core.cli.adapter import Command, add_group
from geodino.config import (
    CanopyEvaluateCfg,
    CanopyFitRecipe,
    CanopyInspectCfg,
    CanopyPredictRecipe,
    CanopySynthCfg,
    CanopyZonalCfg,
    FitOptions,
)

CANOPY_COMMANDS: tuple[Command, ...] = (
    Command(
        "synth",
        "write synthetic forest scenes (RGB GeoTIFF + matching CHM)",
        "geodino.services:synth",
        schema=CanopySynthCfg,
        description="Deterministic synthetic forests: allometric crowns, sun-angle shadows whose length follows "
        "height, ground texture, gaps and nodata; RGB and CHM on one projected grid.",
    ),
    Command(
        "fit",
        "fit a canopy-height head on a frozen backbone from image/CHM pairs",
        "geodino.services:fit",
        schema=CanopyFitRecipe,
        options=FitOptions,
        recipe_positional=True,
        kinds=("canopy_fit",),
        description="Train a canopy-height head from a canopy_fit recipe; writes model.safetensors (+ .json), "
        "metrics.json (validation MAE/RMSE/R2/bias and a predict-the-mean baseline), metrics.jsonl and plots.",
        examples="example:\n  dinoscope canopy fit recipes/tiny/canopy_fit.yaml optim.epochs=20",
    ),
    Command(
        "predict",
        "predict canopy height for GeoTIFFs into Cloud-Optimised GeoTIFFs",
        "geodino.services:predict_and_preview",
        schema=CanopyPredictRecipe,
        kinds=("canopy_predict",),
        description="Seamless tiled prediction; output CRS, transform and size are the input's, nodata stays "
        "nodata. One input with --out X.tif writes X.tif; otherwise --out is a directory with one COG per input "
        "and mosaic.vrt, touching inputs predicted as one mosaic (no seams at tile borders); --mosaic writes one "
        "COG per mosaic instead. Every input is checked against the dtype and value range the model was trained "
        "on: another dtype is refused unless --input-range or --input-scale converts it. Each COG gets a PNG "
        "preview (input RGB beside the heights).",
        examples="examples:\n  dinoscope canopy predict --model model.safetensors scene.tif --out scene_chm.tif\n"
        "  dinoscope canopy predict --model SSLhuge_satellite.pth tiles/ --out chm/ --uncertainty --dtype uint16\n"
        "  dinoscope canopy predict --model model.safetensors naip/*.tif --out chm.tif --mosaic\n"
        "  dinoscope canopy predict --model model.safetensors s2_l2a.tif --out chm.tif --input-range 0,3000",
    ),
    Command(
        "evaluate",
        "compare a predicted canopy-height raster with a reference CHM",
        "geodino.services:evaluate",
        schema=CanopyEvaluateCfg,
        description="Align REF onto PRED's grid, leave out pixels that are nodata in either, and write "
        "DIR/metrics.json (mae, rmse, r2, block_r2, bias, nmae, per_bin, iou_2m, iou_5m, n_pixels) plus a "
        "pred-vs-ref density plot and map previews.",
    ),
    Command(
        "zonal",
        "per-plot canopy height statistics (polygons, points + buffer, CSV)",
        "geodino.services:zonal",
        schema=CanopyZonalCfg,
        description="Per plot: mean, p50, p95, max and sd of height, canopy cover above the threshold, pixel count, "
        "nodata fraction, area_m2 and valid_area_m2 (exactextract, coverage-weighted; scaled uint16 rasters give "
        "metres). Plots are polygons in any CRS, plot centres with --buffer METRES (buffered in a local metric CRS), "
        "or a CSV with x/y columns and --crs. Input columns are kept and never overwritten (--prefix).",
        examples="examples:\n  dinoscope canopy zonal chm.tif plots.gpkg stats.gpkg\n"
        "  dinoscope canopy zonal chm.tif centres.csv stats.csv --buffer 11.28 --crs EPSG:4326 --prefix chm_",
    ),
    Command(
        "inspect",
        "show a raster's bands, dtype, value range, mask, CRS and GSD (and how they meet a model)",
        "geodino.services:inspect",
        schema=CanopyInspectCfg,
        description="Bands, dtype, value range, nodata and mask, CRS and pixel size of RASTER; with --model, the "
        "model's input record and the checks canopy predict makes (bands, dtype and range, pixel size, CRS), "
        "ending with whether predict would accept, convert or refuse it.",
        examples="example:\n  dinoscope canopy inspect tile.tif --model runs/canopy_fit/model.safetensors",
    ),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Entry point ``dinoscope.commands: canopy``: add ``dinoscope canopy`` and its sub-commands."""
    add_group(subparsers, "canopy", "canopy-height mapping from GeoTIFFs", CANOPY_COMMANDS)
