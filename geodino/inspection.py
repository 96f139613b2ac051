"""``dinoscope canopy inspect RASTER [--model M]``: what a raster holds, and how it meets what a model expects.

Shows the bands (name, colour, dtype, nodata, value range from a bounded decimated read), how validity is decided
(per-dataset mask, alpha band or nodata value; see :mod:`geodino.raster`) and the valid share, the CRS and the pixel
size in metres. With a model it adds the model's input record and runs the same checks as ``canopy predict``: band
selection, dtype and value range (fed as it is, converted by a rule, or refused with the fix), pixel size and CRS.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import DinoscopeError
from geodino.inputs import choose_rule, model_record, percentile_range, sample_values, value_summary
from geodino.model import load_canopy_model
from geodino.prediction import GSD_TOLERANCE, select_bands
from geodino.raster import RasterSource
from geodino.values import user_rule

_METRES_PER_DEGREE = 111_320.0


def inspect_raster(
    path: str | os.PathLike,
    *,
    model_path: str | os.PathLike | None = None,
    bands: Sequence[int | str] | None = None,
    input_range: str = "",
    input_scale: float = 0.0,
    num_heads: int | None = None,
    hrch_blocks: Sequence[int] | None = None,
) -> dict[str, Any]:
    """A JSON-ready report on ``path`` (and, with ``model_path``, on how ``canopy predict`` would treat it).

    Example::

        from geodino.inspection import inspect_raster, format_report
        print(format_report(inspect_raster("tile.tif", model_path="model.safetensors")))
    """
    path = Path(path)
    with RasterSource(path, bands=bands) as src:
        values = sample_values(src)
        summary = value_summary(values)
        _, valid = src.read_decimated(250_000)
        report: dict[str, Any] = {
            "path": str(path),
            "size": [src.width, src.height],
            "crs": _crs_text(src.crs),
            "pixel_size_m": _pixel_metres(src),
            "mask": src.mask_kind,
            "valid_fraction": round(float(valid.mean()), 4) if valid.size else 0.0,
            "bands": [
                {
                    "index": index,
                    "name": name,
                    "dtype": src.dataset.dtypes[index - 1],
                    "nodata": src.dataset.nodatavals[index - 1],
                    **{k: (v[k_band] if v else None) for k, v in summary.items()},
                }
                for k_band, (index, name) in enumerate(zip(src.indexes, src.band_names, strict=True))
            ],
        }
    if model_path is not None:
        report["model"] = _compare(path, model_path, bands, input_range, input_scale, num_heads, hrch_blocks, report)
    return report


def _compare(
    path: Path,
    model_path: str | os.PathLike,
    bands: Sequence[int | str] | None,
    input_range: str,
    input_scale: float,
    num_heads: int | None,
    hrch_blocks: Sequence[int] | None,
    report: dict[str, Any],
) -> dict[str, Any]:
    model = load_canopy_model(model_path, num_heads=num_heads, out_indices=hrch_blocks)
    record = model_record(model.metadata)
    info: dict[str, Any] = {
        "path": str(model_path),
        "bands": model.band_names,
        "input": record.describe() if record else "no record (fitted by an older dinoscope)",
        "gsd_m": model.metadata.get("gsd_m"),
        "checks": [],
    }
    if model.spec.get("kind") == "hrch":
        config = model.spec["config"]
        info["hrch"] = {
            "public_checkpoint": config.get("public") or "no",
            "num_heads": config["backbone"]["num_heads"],
            "decoder_blocks": config["out_indices"],
        }
    checks = info["checks"]
    try:
        selected = select_bands(path, model, bands, model_path)
        checks.append(f"bands: ok, feeding {selected}")
        with RasterSource(path, bands=selected) as src:
            target = record.range if record else (0.0, 255.0)
            rule = user_rule(input_range, input_scale, target, lambda: percentile_range([src]))
            chosen = choose_rule(record, src, rule, model_name=Path(model_path).name)
        checks.append(f"values: converted by {chosen.describe()}" if chosen else "values: ok, fed as they are")
        info["verdict"] = "canopy predict would accept this raster"
    except DinoscopeError as err:
        checks.append(f"refused: {err.message}" + (f" (fix: {err.fix})" if err.fix else ""))
        info["verdict"] = "canopy predict would refuse this raster"
    trained, size = model.metadata.get("gsd_m"), report["pixel_size_m"][0]
    if trained and size and not 1 / GSD_TOLERANCE <= size / trained <= GSD_TOLERANCE:
        checks.append(f"pixel size: {size:.3g} m, but the model was trained at {trained:.3g} m (heights may be biased)")
    elif trained:
        checks.append(f"pixel size: ok ({size:.3g} m; trained at {trained:.3g} m)")
    if "geographic" in report["crs"]:
        checks.append("CRS: geographic (degrees); canopy models expect square pixels in metres: reproject to UTM")
    return info


def _crs_text(crs: Any) -> str:
    if crs is None:
        return "none"
    epsg = crs.to_epsg()
    name = f"EPSG:{epsg}" if epsg else crs.to_string()[:60]
    if crs.is_geographic:
        return f"{name} (geographic, degrees)"
    unit, _ = crs.linear_units_factor
    return f"{name} (projected, {unit})"


def _pixel_metres(src: RasterSource) -> list[float]:
    """Pixel width and height in metres (degrees converted at the raster's centre latitude)."""
    x, y = src.res
    if src.crs is not None and src.crs.is_geographic:
        lat = (src.bounds.bottom + src.bounds.top) / 2
        return [round(x * _METRES_PER_DEGREE * math.cos(math.radians(lat)), 4), round(y * _METRES_PER_DEGREE, 4)]
    factor = float(src.crs.linear_units_factor[1]) if src.crs is not None else 1.0
    return [round(x * factor, 6), round(y * factor, 6)]


def format_report(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    lines = [
        f"raster      {report['path']}",
        f"size        {report['size'][0]} x {report['size'][1]} pixels",
        f"crs         {report['crs']}",
        f"pixel size  {report['pixel_size_m'][0]:g} x {report['pixel_size_m'][1]:g} m",
        f"mask        {report['mask']}; {100 * report['valid_fraction']:.1f}% of pixels valid",
        "bands",
    ]
    for b in report["bands"]:
        span = (
            "no valid values"
            if b["min"] is None
            else (f"min {b['min']:g}  p2 {b['p2']:g}  p98 {b['p98']:g}  max {b['max']:g}")
        )
        lines.append(f"  {b['index']:>3} {b['name']:<10} {b['dtype']:<8} nodata {b['nodata']}  {span}")
    model = report.get("model")
    if model:
        lines += [f"model       {model['path']}", f"  expects   {len(model['bands'])} bands {model['bands']}"]
        lines.append(f"  inputs    {model['input']}")
        if "hrch" in model:
            h = model["hrch"]
            lines.append(
                f"  hrch      public: {h['public_checkpoint']}, heads {h['num_heads']}, "
                f"decoder blocks {h['decoder_blocks']}"
            )
        lines += [f"  - {check}" for check in model["checks"]]
        lines.append(f"  => {model['verdict']}")
    return "\n".join(lines)


def report_json(report: dict[str, Any]) -> str:
    """The report as JSON (NaN and infinities as null)."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, (float, np.floating)):
            return float(value) if math.isfinite(value) else None
        return value

    return json.dumps(clean(report), indent=2)
