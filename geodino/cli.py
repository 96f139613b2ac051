"""`dinoscope canopy ...` sub-commands.

``register`` adds one ``canopy`` parser whose own sub-commands are listed in :data:`CANOPY_COMMANDS` (sub-command
names -> function adding those sub-parsers): ``fit`` and ``predict`` live in :mod:`geodino.cli_model`, ``evaluate``
and ``zonal`` here. Handlers import their heavy modules (rasterio, geopandas, matplotlib, torch) only when they run,
so ``dinoscope --help`` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="compare a predicted canopy-height raster with a reference CHM",
        description="Align REF onto PRED's grid, leave out pixels that are nodata in either, and "
        "write DIR/metrics.json (mae, rmse, r2, block_r2, bias, nmae, per_bin, iou_2m, iou_5m, "
        "n_pixels) plus a pred-vs-ref density plot and map previews.",
    )
    p.add_argument("pred", help="predicted canopy height raster (metres, or with a GDAL scale)")
    p.add_argument("ref", help="reference canopy height model (e.g. lidar CHM), any CRS")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--resampling",
        default="bilinear",
        help="how REF is resampled onto PRED's grid: bilinear (upsampling), average or max (downsampling)",
    )
    p.add_argument("--block", type=int, default=50, help="block size in pixels for block R2 (HRCH: 50)")
    p.add_argument("--trim", type=int, default=3, help="border trimmed before block R2, in pixels (HRCH: 3)")
    p.add_argument(
        "--ref-scale",
        type=float,
        default=None,
        help="metres per REF unit when the file has no scale metadata (0.1 for decimetres)",
    )
    p.add_argument("--pred-scale", type=float, default=None, help="metres per PRED unit (default: file metadata)")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from geodino.evaluate import evaluate_rasters

    result = evaluate_rasters(
        args.pred,
        args.ref,
        args.out,
        resampling=args.resampling,
        block=args.block,
        trim=args.trim,
        pred_scale=args.pred_scale,
        ref_scale=args.ref_scale,
    )
    print(
        f"MAE {result['mae']:.3f} m  RMSE {result['rmse']:.3f} m  R2 {result['r2']:.3f}  "
        f"block R2 {result['block_r2']:.3f}  bias {result['bias']:+.3f} m  n={result['n_pixels']}"
    )
    return 0


def _add_zonal(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "zonal",
        help="per-polygon canopy height statistics",
        description="Per polygon: mean, p50, p95 height, canopy cover fraction above the threshold, "
        "pixel count and nodata fraction (exactextract, coverage-weighted). Polygons in any CRS; "
        "attribute columns are kept.",
    )
    p.add_argument("raster", help="canopy height raster")
    p.add_argument("polygons", help="polygons: GeoPackage, GeoParquet, shapefile or GeoJSON")
    p.add_argument("output", help="output file (.gpkg recommended; .parquet or .geojson also work)")
    p.add_argument("--cover-threshold", type=float, default=5.0, help="canopy cover threshold in metres")
    p.add_argument("--band", type=int, default=1, help="raster band holding heights")
    p.set_defaults(func=_run_zonal)


def _run_zonal(args: argparse.Namespace) -> int:
    from geodino.zonal import zonal_to_file

    out = zonal_to_file(args.raster, args.polygons, args.output, cover_threshold=args.cover_threshold, band=args.band)
    print(out)
    return 0


def _add_fit_and_predict(sub: argparse._SubParsersAction) -> None:
    from geodino.cli_model import add_model_commands

    add_model_commands(sub)


def _cmd_synth(args: argparse.Namespace) -> int:
    from geodino.synthetic import make_forest

    for i in range(args.scenes):
        for path in make_forest(args.out, size=args.size, seed=args.seed + i, res=args.res, crs=args.crs):
            print(path)
    return 0


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write synthetic forest scenes (RGB GeoTIFF + matching CHM)",
        description="Deterministic synthetic forests: allometric crowns, sun-angle shadows whose "
        "length follows height, ground texture, gaps and nodata; RGB and CHM on one projected grid.",
    )
    p.add_argument("out", help="output directory")
    p.add_argument("--scenes", type=int, default=1, help="number of scenes (seeds seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=512, help="scene side in pixels")
    p.add_argument("--res", type=float, default=0.5, help="pixel size in metres")
    p.add_argument("--crs", default="EPSG:32617", help="projected CRS")
    p.set_defaults(func=_cmd_synth)


CANOPY_COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "synth": _add_synth,
    "fit, predict": _add_fit_and_predict,
    "evaluate": _add_evaluate,
    "zonal": _add_zonal,
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``canopy`` and its sub-commands to the ``dinoscope`` parser."""
    canopy = subparsers.add_parser(
        "canopy",
        help="canopy-height mapping from GeoTIFFs",
        description="Canopy-height mapping from GeoTIFFs with DINO features.",
    )
    sub = canopy.add_subparsers(dest="canopy_command", metavar="SUBCOMMAND")
    sub.required = True
    for add in CANOPY_COMMANDS.values():
        add(sub)
