"""Compare each input raster with the inputs a canopy model was trained on (:class:`geodino.values.InputRecord`).

``canopy fit`` writes the record from its training images; ``canopy predict`` (and ``canopy inspect --model``)
check every input against it before anything is predicted:

* the user gave ``--input-range`` or ``--input-scale``: that rule converts every input (a scale that leaves the
  values outside the model's range is reported, a range is clipped onto it);
* the input has the dtype the model was trained on: it is fed as it is, or through the rule stored with the model,
  unless its values lie far outside the trained range (a float model fed values a thousand times larger);
* another dtype: refused, naming both dtypes and the value range found, with the options that would convert it.

Values are sampled from a bounded decimated read (GDAL serves it from overviews when the file has them), so a
check costs the same for any raster size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import DinoscopeError
from geodino.raster import RasterSource
from geodino.values import InputRecord, InputRule

log = logging.getLogger(__name__)

SAMPLE_PIXELS = 250_000
_FAR = 0.5  # values further than this fraction of the trained span outside it are "far outside"


def sample_values(source: RasterSource, max_pixels: int = SAMPLE_PIXELS) -> np.ndarray:
    """Valid values of the selected bands, ``C x N`` float32, from a decimated read (after ``source.convert``)."""
    data, valid = source.read_decimated(max_pixels)
    return data[:, valid]


def value_summary(values: np.ndarray) -> dict[str, list[float]]:
    """Per band ``min``, ``p2``, ``p98`` and ``max`` of sampled values (empty lists when there are none)."""
    if values.shape[1] == 0:
        return {"min": [], "p2": [], "p98": [], "max": []}
    p = np.percentile(values, [0, 2, 98, 100], axis=1)
    return {name: [float(v) for v in row] for name, row in zip(("min", "p2", "p98", "max"), p, strict=True)}


def percentile_range(sources: Sequence[RasterSource], low: float = 2, high: float = 98) -> tuple[list, list]:
    """Per band ``low`` and ``high`` percentiles pooled over every source: the scene-level pair of
    ``--input-range auto`` (one pair for the whole mosaic, so tiles stay seamless)."""
    pooled = np.concatenate([sample_values(s, max(1, SAMPLE_PIXELS // len(sources))) for s in sources], axis=1)
    if pooled.shape[1] == 0:
        raise DinoscopeError(
            "no valid pixel to measure the input range from", path=sources[0].path, field="input_range"
        )
    lo, hi = np.percentile(pooled, [low, high], axis=1)
    return list(lo), list(np.maximum(hi, lo + 1e-6))


def model_record(metadata: dict[str, Any]) -> InputRecord | None:
    """The input record stored with a model (``metadata["input"]``), or None for models fitted before records."""
    data = metadata.get("input")
    return InputRecord.from_dict(data) if isinstance(data, dict) and "dtype" in data else None


def _span(values: np.ndarray) -> str:
    if values.size == 0:
        return "no valid values"
    return f"values {float(np.min(values)):g}..{float(np.max(values)):g}"


def _outside(values: np.ndarray, target: tuple[float, float]) -> bool:
    if values.size == 0:
        return False
    low, high = np.percentile(values, [1, 99])
    span = target[1] - target[0]
    return bool(low < target[0] - _FAR * span or high > target[1] + _FAR * span)


def choose_rule(
    record: InputRecord | None,
    source: RasterSource,
    user: InputRule | None,
    *,
    model_name: str,
    max_pixels: int = SAMPLE_PIXELS,
) -> InputRule | None:
    """The rule that brings ``source`` (opened without a rule) to the model's inputs; raises when there is none.

    See the module docstring for the order of the checks; ``max_pixels`` bounds the sample read from ``source``.
    """
    values = sample_values(source, max_pixels)
    if record is None:
        if user is None:
            log.warning(
                "%s: the model %s has no record of the inputs it was trained on (fitted by an older dinoscope); "
                "%s %s are fed as they are",
                source.path,
                model_name,
                source.dtype,
                _span(values),
            )
        return user
    if user is not None:
        converted = user.apply(values[:, :, None])[:, :, 0] if values.size else values
        if user.kind == "scale" and _outside(converted, record.range):
            log.warning(
                "%s: after %s the values span %s, far outside the %s the model was trained on",
                source.path,
                user.describe(),
                _span(converted),
                f"{record.range[0]:g}..{record.range[1]:g}",
            )
        return user
    if source.dtype == record.dtype:
        rule = record.rule
        converted = rule.apply(values[:, :, None])[:, :, 0] if rule is not None and values.size else values
        if not _outside(converted, record.range):
            if rule is not None:
                log.info(
                    "%s: converting %s inputs by the rule stored with the model: %s",
                    source.path,
                    source.dtype,
                    rule.describe(),
                )
            return rule
        why = f"its {_span(converted)} lie far outside the trained {record.range[0]:g}..{record.range[1]:g}"
    else:
        why = f"it is {source.dtype} ({_span(values)}), not {record.dtype}"
    raise DinoscopeError(
        f"the model {model_name} was trained on inputs of {record.describe()}, but {why}; fed as it is, it would "
        "give meaningless heights",
        path=source.path,
        field="input_range",
        fix=_conversion_fix(values, record, source),
    )


def _conversion_fix(values: np.ndarray, record: InputRecord, source: RasterSource) -> str:
    top = float(np.percentile(values, 99.9)) if values.size else 1.0
    low, high = record.range
    options = [
        f"--input-range 0,{top:.6g} (maps raw 0..{top:.6g} onto {low:g}..{high:g}, clipping above)",
        "--input-range auto (the 2nd..98th percentiles of all inputs onto the same range)",
    ]
    if top > 0:
        options.append(f"--input-scale {high / top:.6g} (multiplies raw values)")
    return (
        "convert it with one of " + "; ".join(options) + f". See `dinoscope canopy inspect {Path(source.path).name} "
        "--model MODEL`"
    )


def training_record(
    images: Sequence[RasterSource], *, normalise: str, dtype_max: float, rule: InputRule | None
) -> InputRecord:
    """The record of a fit's training images (opened with ``rule``), checked against the normalisation.

    Every image must share the first one's dtype (unless a rule converts them all); with ``weights_meta`` the
    values must lie in ``0..dtype_max``, the range the backbone's mean and std are scaled to.
    """
    first = images[0]
    for image in images[1:]:
        if image.dtype != first.dtype and rule is None:
            raise DinoscopeError(
                f"the training images mix dtypes: {first.path.name} is {first.dtype}, {image.path.name} is "
                f"{image.dtype}",
                path=image.path,
                field="data.input_range",
                fix="fit images of one dtype, or convert them all with data.input_range: '0,MAX' or data.input_scale",
            )
    values = np.concatenate([sample_values(s, max(1, SAMPLE_PIXELS // len(images))) for s in images], axis=1)
    if values.shape[1] == 0:
        raise DinoscopeError("the training images have no valid pixel", path=first.path, field="nodata")
    observed = tuple((float(a), float(b)) for a, b in zip(values.min(axis=1), values.max(axis=1), strict=True))
    if normalise == "weights_meta":
        target = (0.0, float(dtype_max))
        p99 = float(np.percentile(values, 99))
        if _outside(values, target) or p99 < 0.05 * dtype_max:
            raise DinoscopeError(
                f"data.dtype_max is {dtype_max:g} (the backbone's mean/std are for values 0..{dtype_max:g}), but the "
                f"training images are {first.dtype} with {_span(values)}",
                path=first.path,
                field="data.dtype_max",
                fix=f"set data.dtype_max to the images' full-scale value (255 for uint8, 65535 for uint16, 4095 for "
                f"12-bit; here about {p99:.6g}), or convert them with data.input_range: '0,MAX' or data.input_scale",
            )
    else:
        target = (float(values.min()), float(values.max()))
    return InputRecord(dtype=first.dtype, range=target, observed=observed, rule=rule)
