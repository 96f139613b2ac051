"""Per-band affine normalisation of raw raster values: ``(raw - offset) / scale``.

Why the constants are always scene-level (never per window): a model sees a raster one window at a time. If each
window were stretched by its own statistics, the same forest would look brighter in one window than in the next,
so predicted heights would jump at window borders (visible seams even with 50 % overlap, as reported in
DarthReca/depth-any-canopy issue #10) and absolute heights would depend on what else happens to be in the window.
:meth:`BandNormaliser.from_percentiles` therefore computes its statistics ONCE per raster, from a bounded
decimated read, and the same constants are then applied to every window.

A normaliser is saved next to fitted heads (:meth:`to_dict` / :meth:`from_dict`) so prediction uses exactly the
scaling the head was trained with.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from core.errors import DinoscopeError
from geodino.raster import RasterSource

log = logging.getLogger(__name__)

_DICT_KEYS = {"offset", "scale", "band_names", "method"}


class BandNormaliser:
    """Per-band ``(raw - offset) / scale`` giving float32.

    Args:
        offset, scale: one value per band, in raw pixel units; every scale must be positive.
        band_names: optional names of the bands the constants belong to (checked by callers, kept for provenance).
        method: how the constants were obtained (``weights_meta``, ``recipe``, ``percentiles``...).
    """

    def __init__(
        self,
        offset: Sequence[float],
        scale: Sequence[float],
        *,
        band_names: Sequence[str] | None = None,
        method: str = "manual",
    ) -> None:
        self.offset = np.asarray(offset, np.float32).reshape(-1)
        self.scale = np.asarray(scale, np.float32).reshape(-1)
        if self.offset.shape != self.scale.shape:
            raise DinoscopeError(
                f"normalisation has {self.offset.size} offsets but {self.scale.size} scales",
                field="scale",
                fix="give one offset and one scale per band",
            )
        if not np.all(np.isfinite(self.scale)) or np.any(self.scale <= 0):
            raise DinoscopeError(
                f"normalisation scales must be positive and finite, got {self.scale.tolist()}", field="scale"
            )
        self.band_names = None if band_names is None else list(band_names)
        self.method = method

    @property
    def count(self) -> int:
        """Number of bands the constants are for."""
        return int(self.offset.size)

    def __call__(
        self, data: np.ndarray, valid: np.ndarray | None = None, *, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Normalise ``C x H x W`` raw values; pixels where ``valid`` is False become 0 (the post-norm mean).

        ``out`` (float32, ``data``'s shape; may be ``data`` itself) receives the result instead of a new array.
        """
        if data.ndim != 3 or data.shape[0] != self.count:
            raise DinoscopeError(
                f"normaliser is for {self.count} bands but the data has shape {data.shape} (expected C x H x W)",
                field="bands",
                fix="select the same bands the normalisation constants were computed for",
            )
        # One new array, then in place: the same float32 arithmetic as ``(data - offset) / scale`` in a third of the
        # memory traffic (this runs on every pixel a prediction reads).
        out = np.subtract(data, self.offset[:, None, None], out=out, dtype=np.float32)
        np.divide(out, self.scale[:, None, None], out=out)
        if valid is not None and not valid.all():  # most windows are all valid: skip the masked pass
            np.copyto(out, np.float32(0), where=~valid[None])
        return out

    # -- constructors --------------------------------------------------------------------------------------
    @classmethod
    def from_weights_meta(
        cls, mean: Sequence[float], std: Sequence[float], dtype_max: float, band_names: Sequence[str] | None = None
    ) -> BandNormaliser:
        """Raw -> ``(raw / dtype_max - mean) / std``: weights metadata holds mean/std of [0, 1]-scaled inputs.

        ``dtype_max`` is what maps raw values to [0, 1] (255 for uint8 RGB). Folding it in gives
        offset = mean * dtype_max and scale = std * dtype_max.
        """
        if dtype_max <= 0:
            raise DinoscopeError(
                f"dtype_max must be positive, got {dtype_max}",
                field="dtype_max",
                fix="use 255 for uint8, 65535 for uint16, or the sensor's saturation value",
            )
        mean_arr, std_arr = _pair(mean, std)
        return cls(mean_arr * dtype_max, std_arr * dtype_max, band_names=band_names, method="weights_meta")

    @classmethod
    def from_recipe(
        cls, mean: Sequence[float], std: Sequence[float], band_names: Sequence[str] | None = None
    ) -> BandNormaliser:
        """Raw -> ``(raw - mean) / std`` with mean and std given in raw pixel units (e.g. reflectance)."""
        mean_arr, std_arr = _pair(mean, std)
        return cls(mean_arr, std_arr, band_names=band_names, method="recipe")

    @classmethod
    def from_dtype(cls, dtype: str, count: int, band_names: Sequence[str] | None = None) -> BandNormaliser:
        """Raw -> ``raw / dtype_max`` for integer dtypes (identity for floats): a fixed [0, 1] scaling."""
        kind = np.dtype(dtype)
        top = float(np.iinfo(kind).max) if np.issubdtype(kind, np.integer) else 1.0
        return cls([0.0] * count, [top] * count, band_names=band_names, method="dtype")

    @classmethod
    def from_percentiles(
        cls,
        source: RasterSource | Sequence[RasterSource],
        low: float = 2,
        high: float = 98,
        max_pixels: int = 1_000_000,
    ) -> BandNormaliser:
        """Raw -> ``(raw - p_low) / (p_high - p_low)``, so most valid pixels fall in [0, 1].

        The percentiles are global per band: computed once over the whole raster (or over all given rasters
        pooled) from a nearest-neighbour decimated read of at most ``max_pixels`` pixels per raster, ignoring
        invalid pixels. Memory is bounded by ``max_pixels`` whatever the raster size. See the module docstring for
        why this is never done per window.
        """
        sources = list(source) if isinstance(source, Sequence) else [source]
        if not 0 <= low < high <= 100:
            raise DinoscopeError(
                f"percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}", field="percentiles"
            )
        counts = {s.count for s in sources}
        if len(counts) != 1:
            raise DinoscopeError(
                f"rasters have different numbers of selected bands {sorted(counts)}",
                path=sources[0].path,
                field="bands",
                fix="select the same bands in every raster",
            )
        samples = []
        for src in sources:
            data, valid = src.read_decimated(max(1, max_pixels // len(sources)))
            samples.append(data[:, valid])
        pooled = np.concatenate(samples, axis=1)
        if pooled.shape[1] == 0:
            raise DinoscopeError(
                "no valid pixels to compute normalisation percentiles from",
                path=sources[0].path,
                field="nodata",
                fix="check the nodata value and mask of the raster",
            )
        p_low, p_high = np.percentile(pooled, [low, high], axis=1)
        span = p_high - p_low
        flat = span <= 0
        if flat.any():
            log.warning(
                "%s: bands %s are constant between the %g and %g percentiles; using scale 1",
                sources[0].path,
                [sources[0].band_names[i] for i in np.flatnonzero(flat)],
                low,
                high,
            )
            span = np.where(flat, 1.0, span)
        return cls(p_low, span, band_names=sources[0].band_names, method=f"percentiles_{low:g}_{high:g}")

    # -- persistence ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{offset, scale, band_names, method}`` (raw pixel units), stored next to fitted heads."""
        return {
            "offset": self.offset.tolist(),
            "scale": self.scale.tolist(),
            "band_names": self.band_names,
            "method": self.method,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BandNormaliser:
        """Rebuild from :meth:`to_dict`'s output; unknown or missing keys are a :class:`DinoscopeError`."""
        unknown = sorted(set(data) - _DICT_KEYS)
        missing = sorted({"offset", "scale"} - set(data))
        if unknown or missing:
            raise DinoscopeError(
                f"normalisation record has unknown keys {unknown} / missing keys {missing}",
                field="normalisation",
                fix=f"the keys are {sorted(_DICT_KEYS)}",
            )
        return cls(
            data["offset"], data["scale"], band_names=data.get("band_names"), method=data.get("method", "manual")
        )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, BandNormaliser)
            and np.array_equal(self.offset, other.offset)
            and np.array_equal(self.scale, other.scale)
            and self.band_names == other.band_names
        )

    def __repr__(self) -> str:
        return f"BandNormaliser(offset={self.offset.tolist()}, scale={self.scale.tolist()}, method={self.method!r})"


def _pair(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    mean_arr = np.asarray(mean, np.float64).reshape(-1)
    std_arr = np.asarray(std, np.float64).reshape(-1)
    if mean_arr.shape != std_arr.shape:
        raise DinoscopeError(
            f"{mean_arr.size} mean values but {std_arr.size} std values",
            field="std",
            fix="give one mean and one std per band",
        )
    return mean_arr, std_arr
