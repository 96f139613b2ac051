"""``dinoscope canopy fit`` and ``dinoscope canopy predict``.

    dinoscope canopy fit recipes/tiny/canopy_fit.yaml optim.epochs=20
    dinoscope canopy predict --model runs/tiny/canopy_fit/model.safetensors scene.tif --out scene_chm.tif
    dinoscope canopy predict --model SSLhuge_satellite.pth tiles/*.tif --out chm/ --uncertainty --dtype uint16

One input and an ``--out`` ending in ``.tif`` writes that COG; otherwise ``--out`` is a directory that receives
one COG per input and ``mosaic.vrt``. :func:`add_model_commands` adds both sub-commands to the ``canopy`` parser.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import DinoscopeError

log = logging.getLogger(__name__)
_GSD_TOLERANCE = 2.0  # warn when the input pixel size differs from the training one by more than this factor


def predict_files(
    model_path: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    uncertainty: bool = False,
    tile: int = 256,
    overlap: int = 64,
    batch_size: int = 8,
    out_dtype: str = "float32",
    uint16_scale: float = 100.0,
    bands: Sequence[int | str] | None = None,
    device: str = "auto",
    num_workers: int = 1,
    num_heads: int | None = None,
    resume: bool = True,
    progress: bool = True,
) -> list[Path]:
    """Predict canopy height for ``inputs`` with the model at ``model_path``; returns the height COGs written.

    ``inputs`` may hold directories and glob patterns. Every input is checked first (band count, pixel size) so a
    bad file fails before any prediction starts.
    """
    from geodino.model import load_canopy_model, resolve_device
    from geodino.predict import predict_many, predict_raster
    from geodino.pretrain_data import expand_raster_paths

    if not inputs:
        raise DinoscopeError("no input rasters given", field="inputs", fix="list one or more GeoTIFF/VRT files")
    inputs = expand_raster_paths(list(inputs))
    model = load_canopy_model(model_path, device=resolve_device(device), num_heads=num_heads)
    selected = [_check_input(Path(p), model, bands, model_path) for p in inputs]
    if uncertainty and not model.has_std:
        raise DinoscopeError(
            "this model predicts no uncertainty (a regression head)",
            path=model_path,
            field="uncertainty",
            fix="drop --uncertainty, or fit a head with head.mode=bins",
        )
    common: dict[str, Any] = {
        "tile": tile,
        "overlap": overlap,
        "batch_size": batch_size,
        "out_dtype": out_dtype,
        "uint16_scale": uint16_scale,
        "resume": resume,
        "num_workers": num_workers,
        "progress": progress,
    }
    out = Path(out)
    if len(selected) == 1 and out.suffix.lower() in (".tif", ".tiff"):
        from geodino.raster import RasterSource

        std_path = out.with_name(f"{out.stem}_std{out.suffix}") if uncertainty else None
        with RasterSource(inputs[0], bands=selected[0]) as source:
            return [
                predict_raster(model.predict_batch, source, model.normaliser, out, uncertainty_path=std_path, **common)
            ]
    if len(set(map(tuple, selected))) > 1:
        raise DinoscopeError(
            "the inputs need different band selections",
            path=inputs[0],
            field="bands",
            fix="give --bands explicitly, or predict files with different band layouts separately",
        )
    if not uncertainty:
        return predict_many(
            model.predict_batch, list(inputs), out, normaliser=model.normaliser, bands=selected[0], **common
        )
    return _predict_with_std(model, [Path(p) for p in inputs], out, selected[0], common)


def _predict_with_std(
    model: Any, inputs: list[Path], out_dir: Path, bands: list[int], common: dict[str, Any]
) -> list[Path]:
    """Several inputs with uncertainty: ``<stem>.tif`` and ``<stem>_std.tif`` each, and one VRT mosaic per kind.

    (:func:`geodino.predict.predict_many` passes one ``uncertainty_path`` to every input, so it is done here.)
    """
    from geodino.cog import write_vrt
    from geodino.predict import predict_raster
    from geodino.raster import RasterSource

    stems = [p.stem for p in inputs]
    if len(set(stems)) != len(stems):
        raise DinoscopeError(
            "several inputs share a file name, so their outputs would clash",
            path=out_dir,
            field="inputs",
            fix="rename the inputs or predict them into separate directories",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    heights, stds = [], []
    for path in inputs:
        height, std = out_dir / f"{path.stem}.tif", out_dir / f"{path.stem}_std.tif"
        if not (height.exists() and std.exists()):
            with RasterSource(path, bands=bands) as source:
                predict_raster(model.predict_batch, source, model.normaliser, height, uncertainty_path=std, **common)
        heights.append(height)
        stds.append(std)
    write_vrt(heights, out_dir / "mosaic.vrt")
    write_vrt(stds, out_dir / "mosaic_std.vrt")
    return heights


def _check_input(path: Path, model: Any, bands: Sequence[int | str] | None, model_path: str | os.PathLike) -> list[int]:
    """The 1-based band indices to feed the model from ``path``; a clear error when they cannot match."""
    from geodino.raster import RasterSource, check_band_count

    expected = model.in_chans
    wanted = f"the model {Path(model_path).name} (bands {', '.join(model.band_names)})"
    with RasterSource(path, bands=list(bands) if bands else None) as source:
        if bands is None and source.count != expected:
            try:  # the file may hold the model's bands among others, under the same names
                with RasterSource(path, bands=model.band_names) as named:
                    log.info("%s: using bands %s by name", path, named.band_names)
                    return list(named.indexes)
            except DinoscopeError:
                pass
        check_band_count(source, expected, expected_by=wanted)
        _check_gsd(source, model)
        return list(source.indexes)


def _check_gsd(source: Any, model: Any) -> None:
    trained = model.metadata.get("gsd_m")
    if source.crs is not None and source.crs.is_geographic:
        log.warning(
            "%s is in a geographic CRS (degrees); canopy models expect square pixels in metres (UTM)", source.path
        )
    elif trained and not 1 / _GSD_TOLERANCE <= source.res[0] / trained <= _GSD_TOLERANCE:
        log.warning(
            "%s has %.3g m pixels but the model was trained at %.3g m; heights may be biased",
            source.path,
            source.res[0],
            trained,
        )


# -- argparse --------------------------------------------------------------------------------------------------
def _run_fit(args: argparse.Namespace) -> int:
    import json

    from core.config import load_recipe
    from core.train.run_info import write_run_info
    from geodino.config import CanopyFitRecipe
    from geodino.fit import fit_canopy

    recipe = load_recipe(CanopyFitRecipe, args.recipe, args.overrides)
    run_dir = Path(args.output_dir or recipe.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_info(run_dir, args.recipe, args.overrides)  # git commit, package versions, hardware
    result = fit_canopy(recipe, run_dir)
    summary = {k: result[k] for k in ("val", "baseline_train_mean", "best_epoch", "model")}
    print(json.dumps(summary, indent=2))
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    bands = [int(b) if b.isdigit() else b for b in args.bands] if args.bands else None
    written = predict_files(
        args.model,
        args.inputs,
        args.out,
        uncertainty=args.uncertainty,
        tile=args.tile,
        overlap=args.overlap,
        batch_size=args.batch_size,
        out_dtype=args.dtype,
        uint16_scale=args.uint16_scale,
        bands=bands,
        device=args.device,
        num_workers=args.workers,
        num_heads=args.num_heads,
        resume=not args.no_resume,
    )
    from geodino.plots import raster_preview

    for path in written:
        print(path)
        if path.suffix.lower() in (".tif", ".tiff"):
            print(raster_preview(path))
    return 0


def add_model_commands(canopy_subparsers: argparse._SubParsersAction) -> None:
    """Add ``fit`` and ``predict`` to the ``dinoscope canopy`` sub-parsers."""
    fit = canopy_subparsers.add_parser(
        "fit",
        help="fit a canopy-height head on a frozen backbone from image/CHM pairs",
        description="Train a canopy-height head from a canopy_fit recipe; writes model.safetensors (+ .json), "
        "metrics.json (validation MAE/RMSE/R2/bias and a predict-the-mean baseline), metrics.jsonl and plots.",
    )
    fit.add_argument("recipe", help="canopy_fit YAML recipe (see recipes/tiny/canopy_fit.yaml)")
    fit.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.epochs=30")
    fit.add_argument("--output-dir", help="run directory (default: train.output_dir)")
    fit.set_defaults(func=_run_fit)

    pred = canopy_subparsers.add_parser(
        "predict",
        help="predict canopy height for GeoTIFFs into Cloud-Optimised GeoTIFFs",
        description="Seamless tiled prediction; output CRS, transform and size are the input's, nodata stays "
        "nodata. One input with --out X.tif writes X.tif; otherwise --out is a directory with one COG per input "
        "and mosaic.vrt.",
    )
    pred.add_argument("--model", required=True, help="model.safetensors from `canopy fit`, or a full HRCH .pth")
    pred.add_argument("inputs", nargs="+", help="input rasters (GeoTIFF, COG, VRT)")
    pred.add_argument("--out", required=True, help="output .tif (one input) or directory")
    pred.add_argument("--uncertainty", action="store_true", help="also write the per-pixel std (<name>_std.tif)")
    pred.add_argument("--tile", type=int, default=256, help="tile size in pixels (default 256)")
    pred.add_argument("--overlap", type=int, default=64, help="overlap between tiles in pixels (default 64)")
    pred.add_argument("--batch-size", type=int, default=8, help="tiles per model call (default 8)")
    pred.add_argument(
        "--dtype",
        choices=("float32", "uint16"),
        default="float32",
        help="float32 metres with NaN nodata, or uint16 (metres x --uint16-scale, 65535 nodata)",
    )
    pred.add_argument("--uint16-scale", type=float, default=100.0, help="uint16 units per metre (default 100: cm)")
    pred.add_argument("--bands", nargs="+", help="bands to use, 1-based indices or names (default: all)")
    pred.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    pred.add_argument("--workers", type=int, default=1, help="reader threads")
    pred.add_argument("--num-heads", type=int, help="attention heads, for HRCH widths not a multiple of 64")
    pred.add_argument("--no-resume", action="store_true", help="ignore a previous interrupted run's partial output")
    pred.set_defaults(func=_run_predict)
