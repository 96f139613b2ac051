"""Nucleus centroids (from a CellProfiler table, a label image, or built-in detection) and single-cell crops.

Centroids are ``N x 2`` float arrays in ``(y, x)`` pixel order, the order of numpy indexing and of
``skimage.measure.regionprops``; CellProfiler's ``Nuclei_Location_Center_X/Y`` columns are swapped into it.

Crops follow DeepProfiler's convention: a fixed box centred on each nucleus centroid, all channels stacked
(cytomining/DeepProfiler ``deepprofiler/imaging/boxes.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.measure import regionprops
from skimage.segmentation import watershed

from core.errors import DinoscopeError

X_COLUMN = "Nuclei_Location_Center_X"
Y_COLUMN = "Nuclei_Location_Center_Y"


def centroids_from_table(
    table: str | os.PathLike | Any,
    *,
    plate: str | None = None,
    well: str | None = None,
    site: str | int | None = None,
    x_column: str = X_COLUMN,
    y_column: str = Y_COLUMN,
) -> np.ndarray:
    """Centroids ``(y, x)`` of the rows of a CellProfiler nuclei table matching ``plate``/``well``/``site``.

    The table is a CSV path or a DataFrame. Metadata columns may be called ``Metadata_Plate`` or ``plate`` (any
    case); values are compared as text so ``site=1`` matches ``"1"``.
    """
    source = table if isinstance(table, (str, os.PathLike)) else None
    frame = pd.read_csv(table) if source is not None else table
    for column in (x_column, y_column):
        if column not in frame.columns:
            raise DinoscopeError(
                f"nuclei table has no column {column!r}",
                path=source,
                field=column,
                fix="export nuclei locations from CellProfiler (Nuclei_Location_Center_X/Y) or pass x_column/y_column",
            )
    keep = np.ones(len(frame), dtype=bool)
    for key, wanted in (("plate", plate), ("well", well), ("site", site)):
        if wanted is None:
            continue
        column = _metadata_column(frame.columns, key)
        if column is None:
            raise DinoscopeError(
                f"nuclei table has no {key} column to filter on",
                path=source,
                field=key,
                fix=f"add a Metadata_{key.title()} (or {key}) column, or do not filter by {key}",
            )
        keep &= frame[column].astype(str).to_numpy() == str(wanted)
    selected = frame.loc[keep, [y_column, x_column]].to_numpy(dtype=np.float64)
    return selected[np.isfinite(selected).all(axis=1)]


def centroids_from_labels(labels: np.ndarray) -> np.ndarray:
    """Centroids ``(y, x)`` of every object of an instance label image (0 = background), in label order."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype.kind not in "ui":
        raise DinoscopeError(
            f"labels must be a 2-d integer image, got {labels.ndim}-d {labels.dtype}",
            field="labels",
            fix="pass a Y x X instance mask with one integer id per nucleus",
        )
    props = sorted(regionprops(labels), key=lambda p: p.label)
    return np.array([p.centroid for p in props], dtype=np.float64).reshape(-1, 2)


def detect_nuclei(
    image: np.ndarray, *, sigma: float = 2.0, min_area: int = 30, min_distance: int = 6, return_labels: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Find nuclei in a DNA-stain image: smoothing, Otsu threshold, distance-transform watershed.

    Touching nuclei are split by seeding a watershed of the inverted distance transform at its local maxima
    (Beucher & Meyer 1993; the scikit-image gallery example "Watershed segmentation"); the foreground comes from
    Otsu's threshold (Otsu 1979) on the Gaussian-smoothed image.

    Args:
        image: ``Y x X`` nuclei channel, any dtype.
        sigma: Gaussian smoothing in pixels before thresholding.
        min_area: objects smaller than this many pixels are dropped (debris, noise).
        min_distance: minimum distance in pixels between two nucleus seeds; about a nucleus radius.
        return_labels: also return the label image.

    Returns:
        ``N x 2`` centroids ``(y, x)``, and the ``Y x X`` int32 label image when ``return_labels``.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise DinoscopeError(
            f"detect_nuclei needs one Y x X channel, got shape {image.shape}",
            field="image",
            fix="pass the DNA channel only, e.g. image.channel('DNA')",
        )
    labels = np.zeros(image.shape, dtype=np.int32)
    smooth = gaussian(image, sigma=sigma, preserve_range=True)
    if float(smooth.max()) > float(smooth.min()):
        foreground = ndi.binary_fill_holes(smooth > threshold_otsu(smooth))
        foreground = _drop_small(foreground, min_area)
        distance = ndi.distance_transform_edt(foreground)
        components, _ = ndi.label(foreground)
        peaks = peak_local_max(distance, min_distance=min_distance, labels=components, exclude_border=False)
        markers = np.zeros(image.shape, dtype=np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        labels = watershed(-distance, markers, mask=foreground).astype(np.int32)
        labels = _drop_small_labels(labels, min_area)
    centroids = centroids_from_labels(labels)
    return (centroids, labels) if return_labels else centroids


class CellCrops(NamedTuple):
    """Single-cell crops and their bookkeeping.

    Attributes:
        crops: ``N x C x size x size`` in the input dtype.
        at_edge: ``N`` booleans; True where the box crossed the image border (and was padded).
        kept: ``N`` indices into the input centroids.
    """

    crops: np.ndarray
    at_edge: np.ndarray
    kept: np.ndarray


def crop_cells(
    image_data: Any, centroids: np.ndarray, size: int, *, edge: Literal["pad", "skip"] = "pad", pad_value: float = 0
) -> CellCrops:
    """Cut a ``size x size`` box around each centroid from a ``C x Y x X`` field (or a ``Y x X`` plane).

    A box crossing the border is padded with ``pad_value`` (``edge="pad"``, flagged in ``at_edge``) or dropped
    (``edge="skip"``). Centroids outside the image or not finite are always dropped. The field is read into memory
    once (one field, never a plate), since hundreds of small windows on a chunked store would decode it repeatedly.
    The boxes inside the field are cut in one gather over a strided view of it, not cell by cell; only the few
    crossing the border are copied one by one.
    """
    if edge not in ("pad", "skip"):
        raise DinoscopeError(f"unknown edge policy {edge!r}", field="edge", fix="use 'pad' or 'skip'")
    if size < 1:
        raise DinoscopeError(f"crop size must be positive, got {size}", field="size", fix="e.g. size=128")
    data = np.asarray(image_data)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise DinoscopeError(
            f"expected C x Y x X data, got shape {data.shape}",
            field="image_data",
            fix="pass image.data (channels first)",
        )
    n_channels, height, width = data.shape
    centroids = np.asarray(centroids, dtype=np.float64).reshape(-1, 2)
    finite = np.isfinite(centroids).all(axis=1)
    centre = np.floor(np.where(finite[:, None], centroids, -1) + 0.5).astype(np.int64)
    inside = finite & (centre[:, 0] >= 0) & (centre[:, 0] < height) & (centre[:, 1] >= 0) & (centre[:, 1] < width)
    top, left = centre[:, 0] - size // 2, centre[:, 1] - size // 2
    at_edge = (top < 0) | (left < 0) | (top + size > height) | (left + size > width)
    keep = inside & ~at_edge if edge == "skip" else inside
    kept = np.flatnonzero(keep)
    top, left, border = top[kept], left[kept], at_edge[kept]
    if size <= height and size <= width:  # one gather from a strided view of every box of the field [Y', X', C, S, S]
        boxes = sliding_window_view(data, (size, size), axis=(1, 2)).transpose(1, 2, 0, 3, 4)
        crops = boxes[top.clip(0, height - size), left.clip(0, width - size)]  # border boxes are redone below
    else:
        crops = np.empty((len(kept), n_channels, size, size), dtype=data.dtype)
    for out in np.flatnonzero(border):  # the few boxes crossing the border: their part inside, then padding
        crops[out] = pad_value
        y0, x0, y1, x1 = max(top[out], 0), max(left[out], 0), min(top[out] + size, height), min(left[out] + size, width)
        crops[out, :, y0 - top[out] : y1 - top[out], x0 - left[out] : x1 - left[out]] = data[:, y0:y1, x0:x1]
    return CellCrops(crops=crops, at_edge=border, kept=kept)


@dataclass(frozen=True)
class CentroidMatch:
    """One-to-one matching of predicted to reference centroids within ``max_distance`` pixels."""

    pairs: np.ndarray  # K x 2 indices (predicted, reference)
    distances: np.ndarray  # K
    n_predicted: int
    n_reference: int

    @property
    def precision(self) -> float:
        """Matched pairs over predicted centroids (0 when nothing was predicted)."""
        return len(self.pairs) / self.n_predicted if self.n_predicted else 0.0

    @property
    def recall(self) -> float:
        """Matched pairs over reference centroids (0 when there is no reference)."""
        return len(self.pairs) / self.n_reference if self.n_reference else 0.0


def match_centroids(predicted: np.ndarray, reference: np.ndarray, max_distance: float = 5.0) -> CentroidMatch:
    """Optimal one-to-one matching (Hungarian algorithm, Kuhn 1955) keeping pairs closer than ``max_distance``."""
    predicted = np.asarray(predicted, dtype=np.float64).reshape(-1, 2)
    reference = np.asarray(reference, dtype=np.float64).reshape(-1, 2)
    if len(predicted) == 0 or len(reference) == 0:
        return CentroidMatch(np.zeros((0, 2), dtype=np.int64), np.zeros(0), len(predicted), len(reference))
    distance = cdist(predicted, reference)
    # pairs beyond max_distance are made too costly to choose over leaving both unmatched
    rows, cols = linear_sum_assignment(np.where(distance <= max_distance, distance, 1e9))
    close = distance[rows, cols] <= max_distance
    pairs = np.stack([rows[close], cols[close]], axis=1)
    return CentroidMatch(pairs, distance[rows[close], cols[close]], len(predicted), len(reference))


def _drop_small(mask: np.ndarray, min_area: int) -> np.ndarray:
    components, _ = ndi.label(mask)
    return _drop_small_labels(components, min_area) > 0


def _drop_small_labels(labels: np.ndarray, min_area: int) -> np.ndarray:
    areas = np.bincount(labels.ravel())
    small = areas < min_area
    small[0] = False
    out = labels.copy()
    out[small[labels]] = 0
    return out


def _metadata_column(columns: Any, key: str) -> str | None:
    """``Metadata_Plate`` (CellProfiler) or ``plate`` (our tables), matched case-insensitively."""
    by_lower = {str(c).lower(): str(c) for c in columns}
    return by_lower.get(f"metadata_{key}") or by_lower.get(key)
