"""Per-cell quality control of ``dinoscope cells embed``: focus, saturation, debris and edge flags.

Measured on every crop before it is embedded (:func:`measure_cells`), stored per cell in ``cells.parquet``:

* ``focus_<channel>``: the variance of the Laplacian of the crop (at half resolution, 2 x 2 means, so camera noise
  does not dominate it and the measure stays cheap), divided by the crop's variance so that brighter or dimmer stains
  score alike. The variance of the
  Laplacian is the classic autofocus measure (Pech-Pacheco et al., "Diatom autofocusing in brightfield microscopy: a
  comparative study", ICPR 2000; CellProfiler ``MeasureImageQuality`` reports it as ``FocusScore``-like
  ``LocalFocusScore``).
* ``saturated_fraction``: the largest share, over channels, of the crop's pixels at the field's saturation level. A
  channel's level is its maximum when that value forms a plateau (at least 8 pixels and 0.001 % of the field share
  it, and it lies above the channel's median), which is how clipping at a detector's full scale looks whatever the
  bit depth (12-bit data in 16-bit files saturate at 4095).
* ``nucleus_area``: pixels of the nucleus under the crop's centre in the nuclear stain (Otsu threshold of the crop,
  Otsu 1979; the connected component covering the centre), NaN when the run reads no nuclear stain.

Flags are set once every cell of the run is measured (:func:`flag_cells`), against each plate's medians, so a
phenotype shared by a whole well is not mistaken for a defect:

* ``qc_blur``: the geometric mean over channels of the focus scores is below ``min_focus_ratio`` of the plate's;
* ``qc_saturated``: ``saturated_fraction`` is above ``max_saturated``;
* ``qc_debris``: the nucleus area is ``debris_fold`` times smaller or larger than the plate's median (fragments,
  clumps, or a centroid with no nucleus under it);
* ``edge``: the crop crosses the field border (set when cropping, :func:`bio.cells.crop_cells`).

``dinoscope cells profile --qc`` leaves out cells with any flag; :func:`well_counts` counts them per well.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import ndimage as ndi

from bio.cells import crop_cells

QC_FLAGS = ("qc_blur", "qc_saturated", "qc_debris")
FLAG_COLUMNS = ("edge", *QC_FLAGS)
MEASURES = ("focus", "saturated_fraction", "nucleus_area")
_PLATEAU_SHARE, _PLATEAU_MIN = 1e-5, 8  # pixels at the maximum that make it a clipped plateau
_CENTRE = 2  # the nucleus is the component with most pixels within this distance of the crop centre
_PLANE_STRUCTURE = np.zeros((3, 3, 3), bool)  # 4-connectivity within each crop of a stack, never across crops
_PLANE_STRUCTURE[1] = ndi.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class QcThresholds:
    """When a cell is flagged (see the module docstring)."""

    min_focus_ratio: float = 0.5
    max_saturated: float = 0.01
    debris_fold: float = 4.0

    def describe(self) -> dict[str, float]:
        """The thresholds as a dict (recorded with the run's settings)."""
        return {k: float(v) for k, v in asdict(self).items()}


def saturation_levels(data: np.ndarray) -> np.ndarray:
    """Per channel of a ``C x Y x X`` field: the value at which it saturates, ``inf`` where nothing is clipped."""
    levels = np.full(len(data), np.inf)
    for c, plane in enumerate(data):
        top = plane.max()
        at_top = int(np.count_nonzero(plane == top))
        if at_top >= max(_PLATEAU_MIN, _PLATEAU_SHARE * plane.size) and top > np.median(plane):
            levels[c] = float(top)
    return levels


def measure_cells(crops: np.ndarray, levels: np.ndarray, nuclear: int | None) -> dict[str, np.ndarray]:
    """Focus per channel ``[n, C]``, saturated fraction ``[n]`` and nucleus area ``[n]`` of ``N x C x S x S`` crops.

    Args:
        crops: the crops, as cut by :func:`bio.cells.crop_cells`.
        levels: per-channel saturation levels of the field (:func:`saturation_levels`).
        nuclear: index of the nuclear stain among the channels, or None (areas are then NaN).
    """
    n = len(crops)
    x = crops.astype(np.float32, copy=False)
    if n == 0:
        return {
            "focus": np.zeros((0, crops.shape[1]), np.float32),
            "saturated_fraction": np.zeros(0, np.float32),
            "nucleus_area": np.zeros(0, np.float32),
        }
    half = _half_resolution(x)
    lap = (half[..., :-2, 1:-1] + half[..., 2:, 1:-1] + half[..., 1:-1, :-2] + half[..., 1:-1, 2:]) - 4 * half[
        ..., 1:-1, 1:-1
    ]
    focus = _variance(lap) / (_variance(half - half.mean(axis=(2, 3), keepdims=True)) + 1e-12)
    # integer pixels never reach an infinite level (a channel without a clipped plateau): only the others are compared
    clipped = np.isfinite(levels) | (crops.dtype.kind not in "ui")
    saturated = np.zeros(n)
    if clipped.any():
        level = levels[clipped].astype(np.float32)[None, :, None, None]
        saturated = (x[:, clipped] >= level).mean(axis=(2, 3)).max(axis=1)
    area = np.full(n, np.nan, np.float32)
    if nuclear is not None:
        area[:] = nucleus_areas(x[:, nuclear])
    return {
        "focus": focus.astype(np.float32),
        "saturated_fraction": saturated.astype(np.float32),
        "nucleus_area": area,
    }


def measure_field(
    data: np.ndarray, cents: np.ndarray, crop_size: int, edge: str, nuclear: int | None, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """:func:`measure_cells` of every crop of a ``C x Y x X`` field, cut as :func:`bio.cells.crop_cells` cuts them
    (so the rows match the cells the field keeps), ``batch_size`` crops at a time."""
    levels = saturation_levels(data) if len(cents) else np.full(len(data), np.inf)
    parts = [
        measure_cells(crop_cells(data, cents[start : start + batch_size], crop_size, edge=edge).crops, levels, nuclear)
        for start in range(0, len(cents), batch_size)
    ]
    if not parts:
        return measure_cells(np.zeros((0, len(data), crop_size, crop_size), data.dtype), levels, nuclear)
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _half_resolution(x: np.ndarray) -> np.ndarray:
    """2 x 2 means of ``N x C x Y x X`` float32 crops (odd last rows and columns dropped).

    Adds the four quarters in the order ``mean(axis=(3, 5))`` of the ``[.., Y/2, 2, X/2, 2]`` reshape adds them
    (pairs along x first, then the two row sums), so the result is the same to the bit, an order of magnitude faster
    than the strided reduction; tiny or non-contiguous crops, where numpy may order the sums otherwise, take the
    reduction itself.
    """
    n, channels = x.shape[:2]
    height, width = (x.shape[2] // 2) * 2, (x.shape[3] // 2) * 2
    y = x[..., :height, :width]
    if height < 4 or width < 4 or not x.flags.c_contiguous:
        return y.reshape(n, channels, height // 2, 2, width // 2, 2).mean(axis=(3, 5))
    return ((y[..., 0::2, 0::2] + y[..., 0::2, 1::2]) + (y[..., 1::2, 0::2] + y[..., 1::2, 1::2])) / 4


def _variance(values: np.ndarray) -> np.ndarray:
    """Per crop and channel variance of ``N x C x Y x X`` values centred near zero (one pass, no temporaries)."""
    mean = values.mean(axis=(2, 3))
    return np.maximum(np.einsum("ncij,ncij->nc", values, values) / (values.shape[2] * values.shape[3]) - mean**2, 0)


def nucleus_areas(planes: np.ndarray) -> np.ndarray:
    """Per ``S x S`` plane of ``N x S x S`` float32 crops: pixels of the Otsu-foreground component covering most of
    the crop's centre (0 when none does, or the plane is flat), for all crops at once.

    Bit for bit what ``skimage.filters.threshold_otsu`` (256 bins of the plane's range, the bins exactly as
    ``numpy.histogram`` assigns them) and ``scipy.ndimage.label`` (4-connectivity) give crop by crop: the thresholds
    come from one ``N x 256`` histogram and the components from one 3-d labelling whose structure never joins two
    crops.
    """
    n, height, width = planes.shape
    area = np.zeros(n, np.float32)
    if n == 0 or height * width == 0:
        return area
    flat = planes.reshape(n, -1)
    lo, hi = flat.min(axis=1), flat.max(axis=1)
    varied = np.flatnonzero(hi > lo)
    if not len(varied):
        return area
    flat, lo, hi = flat[varied], lo[varied], hi[varied]
    threshold = _otsu_thresholds(flat, lo, hi)
    foreground = planes[varied] > threshold[:, None, None]
    labels, count = ndi.label(foreground, _PLANE_STRUCTURE)
    cy, cx = height // 2, width // 2
    window = labels[:, max(cy - _CENTRE, 0) : cy + _CENTRE + 1, max(cx - _CENTRE, 0) : cx + _CENTRE + 1]
    window = window.reshape(len(varied), -1)
    # the label with most pixels in the window, the smallest on a tie (np.bincount(...).argmax() of each crop)
    hits = (window[:, :, None] == window[:, None, :]).sum(axis=2).astype(np.int64)
    rank = np.where(window > 0, (hits << 40) - window, -1)
    best = np.take_along_axis(window, rank.argmax(axis=1)[:, None], axis=1)[:, 0]
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    area[varied] = np.where(best > 0, sizes[best], 0)
    return area


def _otsu_thresholds(flat: np.ndarray, lo: np.ndarray, hi: np.ndarray, nbins: int = 256) -> np.ndarray:
    """``threshold_otsu`` of each row of ``flat`` (``lo < hi`` its minima and maxima), with numpy's binning."""
    rows = np.arange(len(flat))[:, None]
    edges = np.linspace(lo, hi, nbins + 1, endpoint=True, dtype=flat.dtype, axis=1)
    index = ((flat - lo[:, None]) / (hi - lo)[:, None] * nbins).astype(np.intp)
    index[index == nbins] -= 1
    # numpy.histogram's correction of values within an ulp of an edge
    at = index + rows * (nbins + 1)
    at -= flat < edges.ravel().take(at)
    at += (flat >= edges.ravel().take(at + 1)) & (at - rows * (nbins + 1) != nbins - 1)
    counts = np.bincount((at - rows).ravel(), minlength=len(flat) * nbins).reshape(-1, nbins).astype(np.float32)
    centres = (edges[:, :-1] + edges[:, 1:]) / 2.0
    weight1 = np.cumsum(counts, axis=1)
    weight2 = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]
    mass = counts * centres
    mean1 = np.cumsum(mass, axis=1) / weight1
    mean2 = (np.cumsum(mass[:, ::-1], axis=1) / weight2[:, ::-1])[:, ::-1]
    variance12 = weight1[:, :-1] * weight2[:, 1:] * (mean1[:, :-1] - mean2[:, 1:]) ** 2
    return np.take_along_axis(centres, variance12.argmax(axis=1)[:, None], axis=1)[:, 0]


def focus_score(focus: np.ndarray) -> np.ndarray:
    """One focus value per cell: the geometric mean of its per-channel scores ``[n, C]``."""
    return np.exp(np.log(np.maximum(focus, 1e-12)).mean(axis=1))


def plate_medians(measured: Iterable[tuple[str, dict[str, np.ndarray]]]) -> dict[str, dict[str, float]]:
    """Median focus score and nucleus area per plate, from ``(plate, measurements)`` of every field; a field's
    measurements give ``focus [n, C]`` or its :func:`focus_score` ``focus_score [n]``, and ``nucleus_area``."""
    focus: dict[str, list[np.ndarray]] = {}
    area: dict[str, list[np.ndarray]] = {}
    for plate, rows in measured:
        focus.setdefault(plate, []).append(rows["focus_score"] if "focus_score" in rows else focus_score(rows["focus"]))
        area.setdefault(plate, []).append(rows["nucleus_area"])
    medians = {}
    for plate in focus:
        scores, areas = np.concatenate(focus[plate]), np.concatenate(area[plate])
        areas = areas[np.isfinite(areas)]
        medians[plate] = {
            "focus": float(np.median(scores)) if len(scores) else np.nan,
            "nucleus_area": float(np.median(areas)) if len(areas) else np.nan,
        }
    return medians


def flag_cells(rows: dict[str, np.ndarray], medians: dict[str, float], qc: QcThresholds) -> dict[str, np.ndarray]:
    """The three QC flags of one field's cells, given its plate's medians (see the module docstring)."""
    score = focus_score(rows["focus"])
    area = rows["nucleus_area"]
    with np.errstate(invalid="ignore"):
        debris = np.isfinite(area) & (
            (area * qc.debris_fold < medians["nucleus_area"]) | (area > qc.debris_fold * medians["nucleus_area"])
        )
    return {
        "qc_blur": score < qc.min_focus_ratio * medians["focus"],
        "qc_saturated": rows["saturated_fraction"] > qc.max_saturated,
        "qc_debris": debris,
    }


def qc_schema(channel_names: Sequence[str]) -> list[tuple[str, Any]]:
    """The per-cell table's QC columns and their Arrow types."""
    measures = [("nucleus_area", pa.float32()), ("saturated_fraction", pa.float32())]
    measures += [(f"focus_{name}", pa.float32()) for name in channel_names]
    return measures + [(flag, pa.bool_()) for flag in QC_FLAGS]


def qc_values(rows: dict[str, np.ndarray], channel_names: Sequence[str]) -> dict[str, np.ndarray]:
    """The per-cell table's QC columns from a field's measurements and flags."""
    out = {"nucleus_area": rows["nucleus_area"], "saturated_fraction": rows["saturated_fraction"]}
    out.update({f"focus_{name}": rows["focus"][:, c] for c, name in enumerate(channel_names)})
    out.update({flag: rows[flag] for flag in QC_FLAGS})
    return out


def has_qc(cells_path: str | os.PathLike) -> bool:
    """Whether a per-cell table carries the QC flags (runs embedded before QC existed do not)."""
    return set(QC_FLAGS) <= set(pq.ParquetFile(cells_path).schema_arrow.names)


def well_counts(cells_path: str | os.PathLike, wells_of: Any) -> pd.DataFrame:
    """Cells and flagged cells per well: ``plate, well, n_cells, n_<flag>..., n_flagged`` (flag = any flag).

    ``wells_of`` turns a batch of the table into its (plate, well) index, so wells are named as in the profiles.
    """
    names = set(pq.ParquetFile(cells_path).schema_arrow.names)
    flags = [f for f in FLAG_COLUMNS if f in names]
    parts = []
    for batch in pq.ParquetFile(cells_path).iter_batches(batch_size=1 << 18, columns=["plate", "well", *flags]):
        frame = batch.to_pandas()
        counts = frame[flags].astype(bool)
        counts["flagged"] = counts.any(axis=1)
        counts["cells"] = True
        counts.index = wells_of(frame)
        parts.append(counts.astype(np.int64).groupby(level=[0, 1]).sum())
    table = pd.concat(parts).groupby(level=[0, 1]).sum().sort_index()
    table.columns = [f"n_{c.removeprefix('qc_')}" for c in table.columns]
    order = ["n_cells", *[f"n_{f.removeprefix('qc_')}" for f in flags], "n_flagged"]
    return table[order].reset_index()
