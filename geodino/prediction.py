"""Canopy-height prediction for a list of rasters: the service behind ``dinoscope canopy predict``.

    from geodino import predict_files
    predict_files("runs/canopy_fit/model.safetensors", ["scene.tif"], "scene_chm.tif")        # one COG
    predict_files("SSLhuge_satellite.pth", ["tiles/"], "chm/", uncertainty=True)              # COGs + mosaic.vrt

One input and an ``out`` ending in ``.tif`` writes that COG; otherwise ``out`` is a directory that receives one COG
per input and ``mosaic.vrt`` (touching inputs predicted as one mosaic, so they join without seams), or with
``mosaic`` one COG per mosaic. Every input is checked (band count, pixel size, dtype and value range against the
model's record, not all nodata) before any prediction starts; the output is locked while it is written, and
existing outputs are skipped or refused by their record (:mod:`geodino.outputs`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.windows import Window

from core.distributed.device import resolve_device
from core.errors import DinoscopeError
from core.lock import OutputLock
from core.memory import check_fits_in_memory
from geodino.inputs import SAMPLE_PIXELS, choose_rule, model_record, percentile_range
from geodino.model import load_canopy_model
from geodino.mosaic_predict import predict_many
from geodino.outputs import (
    MODEL_CHUNK,
    check_output_path,
    content_id,
    output_state,
    prediction_record,
    refuse_different,
)
from geodino.plots import raster_preview
from geodino.predict import predict_raster
from geodino.pretrain_data import expand_raster_paths
from geodino.raster import RasterSource, check_band_count, grid_windows
from geodino.values import InputRule, user_rule

log = logging.getLogger(__name__)
GSD_TOLERANCE = 2.0  # warn when the input pixel size differs from the training one by more than this factor


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
    hrch_blocks: Sequence[int] | None = None,
    input_range: str = "",
    input_scale: float = 0.0,
    mosaic: bool = False,
    preview: bool = False,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Predict canopy height for ``inputs`` with the model at ``model_path``; returns the height COGs written.

    ``inputs`` may hold directories and glob patterns. Every input is checked first (band count, pixel size, dtype
    and value range against the model's input record, at least one valid pixel somewhere) so a bad file fails
    before any prediction starts and before any output is touched. Heights are metres; nodata stays nodata.

    Several inputs are predicted as mosaics (:mod:`geodino.mosaic_predict`): touching tiles blend with their
    neighbours' pixels; ``out`` is a directory with one COG per input and ``mosaic.vrt``, or with ``mosaic`` one COG
    per mosaic (``out`` may then be a ``.tif``). ``input_range`` (``"LOW,HIGH"`` or ``"auto"``) or ``input_scale``
    converts inputs of another dtype or range (:mod:`geodino.values`); without them such inputs are refused.
    ``hrch_blocks`` names the decoder's blocks of an HRCH checkpoint that is not one of the public ones.
    ``preview`` writes ``<output>.png`` with the input RGB beside the heights.

    The output (the COG, or the directory) is locked for the whole run, so a second run on it fails at once naming
    the first. Each COG records how it was made (:mod:`geodino.outputs`): an existing output made the same way is
    skipped with a message; one made with another model or other settings is refused unless ``overwrite``.

    Example::

        from geodino import predict_files
        [cog] = predict_files("model.safetensors", ["scene.tif"], "scene_chm.tif", tile=512, device="cuda")
        cogs = predict_files("model.safetensors", ["tiles/"], "chm/", input_range="0,10000")   # uint16 reflectance
    """
    if not inputs:
        raise DinoscopeError("no input rasters given", field="inputs", fix="list one or more GeoTIFF/VRT files")
    inputs = [Path(p) for p in expand_raster_paths(list(inputs))]
    out = Path(out)
    one_file = out.suffix.lower() in (".tif", ".tiff")
    single = len(inputs) == 1 and one_file and not mosaic
    if one_file and len(inputs) > 1 and not mosaic:
        raise DinoscopeError(
            f"{len(inputs)} inputs need a directory as --out (one COG each), not a .tif",
            path=out,
            field="out",
            fix="give a directory, or add --mosaic to write one COG over all inputs",
        )
    check_output_path(out, is_dir=not one_file)
    torch_device = resolve_device(device, field="device")
    model = load_canopy_model(model_path, device=torch_device, num_heads=num_heads, out_indices=hrch_blocks)
    _check_tile_memory(model, tile, batch_size)
    selected = [select_bands(p, model, bands, model_path) for p in inputs]
    if uncertainty and not model.has_std:
        raise DinoscopeError(
            "this model predicts no uncertainty (a regression head)",
            path=model_path,
            field="uncertainty",
            fix="drop --uncertainty, or fit a head with head.mode=bins",
        )
    if not single and len(set(map(tuple, selected))) > 1:
        raise DinoscopeError(
            "the inputs need different band selections",
            path=inputs[0],
            field="bands",
            fix="give --bands explicitly, or predict files with different band layouts separately",
        )
    _check_not_empty(inputs, selected)
    rule = _input_rule(model, inputs, selected[0], input_range, input_scale, Path(model_path).name)
    settings = {
        "tile": tile,
        "overlap": overlap,
        "margin": 0,
        "out_dtype": out_dtype,
        "uint16_scale": float(uint16_scale) if out_dtype == "uint16" else None,
        "uncertainty": uncertainty,
        "num_heads": num_heads or None,
        "hrch_blocks": list(hrch_blocks) if hrch_blocks else None,
        "input_rule": rule.to_dict() if rule is not None else None,
    }
    model_id = content_id(model_path, MODEL_CHUNK)
    common: dict[str, Any] = {
        "tile": tile,
        "overlap": overlap,
        "batch_size": batch_size,
        "out_dtype": out_dtype,
        "uint16_scale": uint16_scale,
        "resume": resume,
        "num_workers": num_workers,
        "progress": progress,
        "pin_memory": torch_device.type == "cuda",  # batches copied to the GPU without blocking the host
    }
    if single:
        record = prediction_record(model_id, inputs[0], settings | {"bands": selected[0]})
        with RasterSource(inputs[0], bands=selected[0], convert=rule) as source:
            written = _predict_one(model, source, out, uncertainty, record, overwrite, common)
            if preview:
                raster_preview(written, rgb=source)
        return [written]
    return predict_many(
        model.predict_batch,
        inputs,
        out,
        normaliser=model.normaliser,
        bands=selected[0],
        convert=rule,
        uncertainty=uncertainty,
        one_cog=mosaic,
        record_base={"model": model_id, **settings, "bands": selected[0], "mosaic": mosaic},
        overwrite=overwrite,
        preview=preview,
        **common,
    )


def _input_rule(
    model: Any, inputs: list[Path], bands: list[int], input_range: str, input_scale: float, model_name: str
) -> InputRule | None:
    """The one rule every input is converted by (:func:`geodino.inputs.choose_rule`), checked on each input."""
    record = model_record(model.metadata)
    target = record.range if record is not None else (0.0, 255.0)

    def auto() -> tuple[list, list]:
        sources = [RasterSource(p, bands=bands) for p in inputs]
        try:
            return percentile_range(sources)
        finally:
            for source in sources:
                source.close()

    user = user_rule(input_range, input_scale, target, auto)
    per_input = max(10_000, SAMPLE_PIXELS // len(inputs))  # a folder of thousands of tiles stays a quick check
    rule = None
    for path in inputs:
        with RasterSource(path, bands=bands) as source:
            rule = choose_rule(record, source, user, model_name=model_name, max_pixels=per_input)
    return rule


def _predict_one(
    model: Any,
    source: RasterSource,
    out: Path,
    uncertainty: bool,
    record: dict[str, Any],
    overwrite: bool,
    common: dict[str, Any],
) -> Path:
    """One input into the COG ``out`` (and ``<out>_std``), under the output's lock."""
    std_path = out.with_name(f"{out.stem}_std{out.suffix}") if uncertainty else None
    with OutputLock(out, what="prediction", is_dir=False):
        state, differences = output_state([out] + ([std_path] if std_path else []), record)
        if state == "complete":
            log.info("%s is already complete (same model, settings and input): skipped", out)
            return out
        if state == "different" and not overwrite:
            refuse_different([(out, differences)])
        return predict_raster(
            model.predict_batch, source, model.normaliser, out, uncertainty_path=std_path, record=record, **common
        )


def _check_not_empty(inputs: list[Path], selected: list[list[int]]) -> None:
    """Refuse a prediction that would write nothing but nodata; warn about single empty inputs among others."""
    empty: list[tuple[Path, Any]] = []
    for path, bands in zip(inputs, selected, strict=True):
        with RasterSource(path, bands=bands) as source:
            if not has_valid_pixels(source):
                empty.append((path, source.nodata))
    if empty and len(empty) == len(inputs):
        path, nodata = empty[0]
        by = f"nodata value {nodata!r}, the mask or NaN" if nodata is not None else "the mask or NaN"
        raise DinoscopeError(
            f"every pixel of {'every input' if len(inputs) > 1 else 'the input'} is nodata ({by}), so the "
            "prediction would contain no height at all",
            path=path,
            field="inputs",
            fix="check the input (an empty tile?) and its nodata value, e.g. with `gdalinfo -stats`",
        )
    for path, _ in empty:
        log.warning("%s has no valid pixel: its output will be all nodata", path)


def has_valid_pixels(source: RasterSource, size: int = 256) -> bool:
    """Whether any pixel of the selected bands is valid: nine windows spread over the raster first (enough for any
    real image, and cheap), then, only when those are all nodata, a scan that stops at the first valid pixel."""
    spots = {
        (int(y), int(x))
        for y in np.linspace(0, max(0, source.height - size), 3)
        for x in np.linspace(0, max(0, source.width - size), 3)
    }
    for y, x in sorted(spots):
        if source.read(Window(x, y, size, size), boundless=False)[1].any():
            return True
    return any(source.read(w, boundless=False)[1].any() for w in grid_windows(source.width, source.height, 2048))


def _check_tile_memory(model: Any, tile: int, batch_size: int) -> None:
    """Refuse a tile size whose forward pass cannot fit in memory (``--tile 1000000`` would ask for terabytes)."""
    backbone = getattr(model.net, "backbone", None)
    dim = getattr(backbone, "embed_dim", 1024)
    tokens = math.ceil(tile / model.pad_multiple) ** 2
    # about 16 live (tokens x dim) fp32 activations per image, plus one head's (tokens x tokens) attention scores
    needed = batch_size * (16 * tokens * dim * 4 + tokens * tokens * 4)
    check_fits_in_memory(
        needed,
        what=f"a batch of {batch_size} tiles of {tile} x {tile} pixels",
        field="tile",
        fix="use a smaller --tile (256-1024 is typical) or --batch-size",
    )


def select_bands(path: Path, model: Any, bands: Sequence[int | str] | None, model_path: str | os.PathLike) -> list[int]:
    """The 1-based band indices to feed the model from ``path`` (the model's bands by name when the file has more);
    a clear error when they cannot match. Warns about a geographic CRS or a pixel size far from the training one."""
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
    elif trained and not 1 / GSD_TOLERANCE <= source.res[0] / trained <= GSD_TOLERANCE:
        log.warning(
            "%s has %.3g m pixels but the model was trained at %.3g m; heights may be biased",
            source.path,
            source.res[0],
            trained,
        )
