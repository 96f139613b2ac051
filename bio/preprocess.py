"""Per-plate illumination correction and per-channel intensity normalisation.

Illumination: the flat-field of one channel is a heavily smoothed robust average of many fields of a plate, scaled to
mean 1; images are divided by it (Singh, Bray, Jones & Carpenter, "Pipeline for illumination correction of images for
high-throughput microscopy", J. Microscopy 2014; CellProfiler ``CorrectIlluminationCalculate``/``Apply``, which also
downsample before smoothing).

Normalisation, per image and per channel:
* ``"percentile"``: clip to the image's ``low``/``high`` percentiles and scale to [0, 1] (DeepProfiler
  ``compression.py`` clips 16-bit fields at percentiles before 8-bit conversion);
* ``"zscore"``: ``(x - mean) / (std + 1e-7)`` over Y x X, the self-normalisation of Cell-DINO and DINO4Cells
  (facebookresearch/dinov2 ``dinov2/data/cell_dino/transforms.py``, ``SelfNormalizeNoDiv``);
* ``"none"``: float32 copy.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.ndimage import gaussian_filter
from skimage.transform import resize

from core.errors import DinoscopeError
from core.io import atomic_path

NormMethod = Literal["percentile", "zscore", "none"]
NORM_METHODS = ("percentile", "zscore", "none")


def estimate_illumination(
    images: Iterable[Any],
    channel: str,
    *,
    sigma: float = 50.0,
    max_images: int = 64,
    statistic: Literal["median", "mean"] = "median",
    downsample: int = 4,
) -> np.ndarray:
    """Smooth flat-field (``Y x X`` float32, mean 1) of ``channel`` from up to ``max_images`` fields.

    Args:
        images: :class:`~bio.io.Image` objects, or tuples whose last item is one (so ``iter_fields(plate)`` works).
        channel: channel name.
        sigma: Gaussian smoothing in full-resolution pixels; it should exceed a cell diameter so cells average out.
        max_images: fields used at most (memory for ``"median"`` is ``max_images`` downsampled planes).
        statistic: per-pixel ``"median"`` (robust to bright debris) or ``"mean"`` (streams in constant memory).
        downsample: block-averaging factor applied before the statistic and smoothing, for speed.
    """
    planes: list[np.ndarray] = []
    total: np.ndarray | None = None
    count = 0
    full_shape: tuple[int, ...] | None = None
    for item in images:
        image = item[-1] if isinstance(item, tuple) else item
        plane = np.asarray(image.channel(channel), dtype=np.float32)
        if full_shape is None:
            full_shape = plane.shape
        elif plane.shape != full_shape:
            raise DinoscopeError(
                f"field size {plane.shape} differs from the first field's {full_shape}",
                path=image.path,
                field=channel,
                fix="estimate illumination per image size",
            )
        small = _block_mean(plane, downsample)
        if statistic == "median":
            planes.append(small)
        else:
            total = small if total is None else total + small
        count += 1
        if count >= max_images:
            break
    if full_shape is None:
        raise DinoscopeError(
            "no images to estimate illumination from", field=channel, fix="pass an iterable with at least one field"
        )
    average = np.median(np.stack(planes), axis=0) if statistic == "median" else total / count
    smooth = gaussian_filter(average, sigma=max(sigma / downsample, 0.5), mode="nearest")
    flat = resize(smooth, full_shape, order=1, mode="edge", anti_aliasing=False).astype(np.float32)
    flat = np.maximum(flat, 1e-6)
    return flat / flat.mean()


def apply_illumination(data: np.ndarray, flatfield: np.ndarray) -> np.ndarray:
    """Divide ``data`` (``Y x X`` or ``C x Y x X``) by a flat-field of matching (or broadcastable) shape; float32."""
    data = np.asarray(data, dtype=np.float32)
    flatfield = np.asarray(flatfield, dtype=np.float32)
    if data.shape[-2:] != flatfield.shape[-2:]:
        raise DinoscopeError(
            f"flat-field shape {flatfield.shape} does not match image shape {data.shape}",
            field="illumination",
            fix="estimate the flat-field on fields of the same size",
        )
    return data / np.maximum(flatfield, 1e-6)


def save_illumination(path: str | os.PathLike, flatfields: Mapping[str, np.ndarray]) -> Path:
    """Store one flat-field per channel name in an ``.npz`` file, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.savez_compressed(handle, **{name: np.asarray(f, dtype=np.float32) for name, f in flatfields.items()})
    return path


def load_illumination(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read flat-fields written by :func:`save_illumination`."""
    try:
        with np.load(path) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise DinoscopeError(
            f"not an illumination file ({exc})",
            path=path,
            fix="use an .npz written by bio.preprocess.save_illumination",
        ) from exc


def normalise(
    data: np.ndarray, method: NormMethod = "percentile", *, low: float = 1.0, high: float = 99.0, eps: float = 1e-7
) -> np.ndarray:
    """Normalise each channel of ``data`` (``C x Y x X``, or ``Y x X``) on its own; returns float32."""
    if method not in NORM_METHODS:
        raise DinoscopeError(f"unknown normalisation {method!r}", field="method", fix=f"use one of {NORM_METHODS}")
    data = np.asarray(data, dtype=np.float32)
    if method == "none":
        return data.copy()
    axes = (-2, -1)
    if method == "zscore":
        mean = data.mean(axis=axes, keepdims=True)
        std = data.std(axis=axes, keepdims=True)
        return (data - mean) / (std + eps)
    if not 0.0 <= low < high <= 100.0:
        raise DinoscopeError(
            f"percentiles low={low}, high={high} are not 0 <= low < high <= 100",
            field="low/high",
            fix="e.g. low=1, high=99",
        )
    lo = np.percentile(data, low, axis=axes, keepdims=True)
    hi = np.percentile(data, high, axis=axes, keepdims=True)
    span = hi - lo
    scaled = (np.clip(data, lo, hi) - lo) / np.where(span > 0, span, 1.0)
    return scaled.astype(np.float32, copy=False)


@dataclass(frozen=True)
class NormalisationSpec:
    """The intensity preprocessing applied before embedding, stored next to the embeddings.

    Attributes:
        method: ``"percentile"``, ``"zscore"`` or ``"none"``.
        low, high: percentiles for ``"percentile"``.
        eps: added to the standard deviation for ``"zscore"``.
        illumination: where the flat-fields came from (e.g. the ``.npz`` path), or ``None`` if not corrected.
    """

    method: NormMethod = "zscore"
    low: float = 1.0
    high: float = 99.0
    eps: float = 1e-7
    illumination: str | None = None

    def __post_init__(self) -> None:
        if self.method not in NORM_METHODS:
            raise DinoscopeError(
                f"unknown normalisation {self.method!r}", field="method", fix=f"use one of {NORM_METHODS}"
            )

    def apply(self, data: np.ndarray) -> np.ndarray:
        """Normalise ``data`` (``C x Y x X`` or ``Y x X``, per channel) with these settings; see :func:`normalise`."""
        return normalise(data, self.method, low=self.low, high=self.high, eps=self.eps)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (recorded in run metadata; :meth:`from_dict` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> NormalisationSpec:
        """Rebuild from :meth:`to_dict`'s output; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DinoscopeError(
                f"unknown normalisation keys {unknown}", field=", ".join(unknown), fix=f"use only {sorted(known)}"
            )
        return cls(**values)


def _block_mean(plane: np.ndarray, factor: int) -> np.ndarray:
    if factor <= 1:
        return plane
    rows, cols = (plane.shape[0] // factor) * factor, (plane.shape[1] // factor) * factor
    if rows == 0 or cols == 0:
        return plane
    trimmed = plane[:rows, :cols]
    return trimmed.reshape(rows // factor, factor, cols // factor, factor).mean(axis=(1, 3))
