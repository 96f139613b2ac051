"""Streaming canopy-height error metrics: feed windows one at a time, read the totals at the end.

Definitions, the union of HRCH and Open-Canopy:

* MAE, RMSE, bias (mean error, ``pred - ref``) and pixel R² (``1 - SSE / SST`` around the reference mean) as in
  HighResCanopyHeight ``inference.py`` (Tolan et al., Remote Sensing of Environment 300:113888, 2024).
* block R² (HRCH): R² between the means of ``block`` x ``block`` pixel blocks (50 px, about 30 m at 0.6 m GSD)
  after trimming ``trim`` (3) pixels from each side of the evaluated image; partial blocks are dropped, as
  ``AvgPool2d(50)`` does.
* nMAE (Open-Canopy, Fogel et al., CVPR 2025, ``src/metrics/compute_metrics.py``): mean of
  ``|pred - ref| / (1 + |ref|)``; the overall value excludes reference heights below 2 m (the 0-2 m bin).
* per-height-bin errors over reference bins 0/2/5/10/15/20/30/60 m (Open-Canopy), plus ``60+``; each bin reports
  n, MAE, RMSE, bias, error std, nMAE and how many predictions fall into that height range.
* tree-cover IoU (Open-Canopy): cover is ``height > threshold`` in both maps, IoU = ``|A and B| / (|A or B| + 1)``,
  counted over all evaluated pixels at once; thresholds 2 m (Open-Canopy's default) and 5 m.

Sums are float64 and merged with Chan et al.'s pairwise update for the variance terms, so results do not depend on
how a raster is cut into windows (up to float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

HEIGHT_BINS: tuple[float, ...] = (0, 2, 5, 10, 15, 20, 30, 60)
IOU_THRESHOLDS: tuple[float, ...] = (2.0, 5.0)


def _select(pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, np.float64)
    ref = np.asarray(ref, np.float64)
    keep = np.isfinite(pred) & np.isfinite(ref)
    if valid is not None:
        keep &= np.asarray(valid, bool)
    return pred[keep], ref[keep]


class MeanVar:
    """Count, mean and sum of squared deviations of a stream of values (Chan et al. 1979 pairwise merge)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, values: np.ndarray) -> None:
        """Merge a batch of values (any shape, all counted) into the running count, mean and ``m2``."""
        n = values.size
        if n == 0:
            return
        mean = float(values.mean())
        m2 = float(((values - mean) ** 2).sum())
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total


class RegressionAccumulator:
    """MAE, RMSE, bias, pixel R² and nMAE over all pixels fed to :meth:`update`."""

    def __init__(self, nmae_min_ref: float = 2.0) -> None:
        self.nmae_min_ref = nmae_min_ref
        self.n = 0
        self.abs_sum = 0.0
        self.sq_sum = 0.0
        self.err_sum = 0.0
        self.nmae_sum = 0.0
        self.nmae_n = 0
        self.ref = MeanVar()
        self.err = MeanVar()

    def update(self, pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Add the pixels of one window: heights in metres, same shape; non-finite or ``valid == False`` pixels
        are skipped."""
        pred, ref = _select(pred, ref, valid)
        err = pred - ref
        self.n += err.size
        self.abs_sum += float(np.abs(err).sum())
        self.sq_sum += float((err * err).sum())
        self.err_sum += float(err.sum())
        tall = ref >= self.nmae_min_ref
        self.nmae_sum += float((np.abs(err[tall]) / (1 + np.abs(ref[tall]))).sum())
        self.nmae_n += int(tall.sum())
        self.ref.update(ref)
        self.err.update(err)

    def result(self) -> dict[str, float]:
        """``mae``, ``rmse``, ``bias``, ``error_std`` and ``nmae`` in metres (nMAE unitless), pixel ``r2`` and
        ``n_pixels``; NaN where undefined (no pixels, or a constant reference for R²)."""
        n = self.n
        nan = float("nan")
        r2 = 1.0 - self.sq_sum / self.ref.m2 if n and self.ref.m2 > 0 else nan
        return {
            "mae": self.abs_sum / n if n else nan,
            "rmse": math.sqrt(self.sq_sum / n) if n else nan,
            "bias": self.err_sum / n if n else nan,
            "r2": r2,
            "error_std": math.sqrt(self.err.m2 / n) if n else nan,
            "nmae": self.nmae_sum / self.nmae_n if self.nmae_n else nan,
            "n_pixels": n,
        }


def block_means(
    values: np.ndarray, valid: np.ndarray, block: int, min_valid_fraction: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Means of the full ``block`` x ``block`` blocks of a 2-D array (partial blocks at the end dropped).

    Returns ``(means, ok)`` as 2-D arrays; ``ok`` marks blocks with at least ``min_valid_fraction`` valid pixels.
    """
    rows, cols = values.shape[0] // block, values.shape[1] // block
    if rows == 0 or cols == 0:
        return np.zeros((rows, cols)), np.zeros((rows, cols), bool)
    v = values[: rows * block, : cols * block].astype(np.float64)
    m = valid[: rows * block, : cols * block]
    v = np.where(m, v, 0.0).reshape(rows, block, cols, block)
    counts = m.reshape(rows, block, cols, block).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = v.sum(axis=(1, 3)) / counts
    return means, counts >= min_valid_fraction * block * block


class BlockR2:
    """HRCH block R²: R² between ``block`` x ``block`` block means of prediction and reference.

    Each :meth:`update` is one evaluated image (a tile, or a strip whose rows are block-aligned): ``trim`` pixels
    are removed from each of its sides before cutting blocks. A block counts when at least
    ``min_valid_fraction`` of its pixels are valid in both maps; the means use its valid pixels only.
    """

    def __init__(self, block: int = 50, trim: int = 3, min_valid_fraction: float = 0.5) -> None:
        self.block = block
        self.trim = trim
        self.min_valid_fraction = min_valid_fraction
        self.sq_sum = 0.0
        self.ref = MeanVar()

    def update(
        self, pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None = None, *, trim: int | None = None
    ) -> None:
        """Add one image's blocks; ``trim`` overrides the border trim (0 for block-aligned pieces of an image
        whose border was already left out)."""
        pred = np.asarray(pred, np.float64)
        ref = np.asarray(ref, np.float64)
        ok = np.isfinite(pred) & np.isfinite(ref)
        if valid is not None:
            ok &= np.asarray(valid, bool)
        t = self.trim if trim is None else trim
        if t:
            pred, ref, ok = pred[t:-t, t:-t], ref[t:-t, t:-t], ok[t:-t, t:-t]
        pred_means, pred_ok = block_means(pred, ok, self.block, self.min_valid_fraction)
        ref_means, _ = block_means(ref, ok, self.block, self.min_valid_fraction)
        self.add_block_means(pred_means[pred_ok], ref_means[pred_ok])

    def add_block_means(self, pred_means: np.ndarray, ref_means: np.ndarray) -> None:
        """Add already computed block means (metres), e.g. from a streaming reader that cuts blocks itself."""
        err = np.asarray(pred_means, np.float64) - np.asarray(ref_means, np.float64)
        self.sq_sum += float((err * err).sum())
        self.ref.update(np.asarray(ref_means, np.float64))

    @property
    def n_blocks(self) -> int:
        """How many blocks have been counted so far."""
        return self.ref.n

    def result(self) -> float:
        """Block R² ``1 - SSE / SST`` of block means (SST around the mean reference block); NaN without blocks."""
        return 1.0 - self.sq_sum / self.ref.m2 if self.ref.n and self.ref.m2 > 0 else float("nan")


class BinnedErrors:
    """Errors per reference-height bin ``[edges[i], edges[i+1])`` plus a last open bin ``[edges[-1], inf)``.

    Reference heights below ``edges[0]`` (negative lidar noise) count in the first bin.
    """

    def __init__(self, edges: Sequence[float] = HEIGHT_BINS) -> None:
        self.edges = np.asarray(edges, np.float64)
        self.labels = [f"{a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:], strict=False)] + [f"{edges[-1]:g}+"]
        k = len(self.labels)
        self.n = np.zeros(k, np.int64)
        self.n_pred = np.zeros(k, np.int64)
        self.abs_sum = np.zeros(k)
        self.sq_sum = np.zeros(k)
        self.err_sum = np.zeros(k)
        self.nmae_sum = np.zeros(k)

    def _bin(self, heights: np.ndarray) -> np.ndarray:
        return np.clip(np.searchsorted(self.edges, heights, side="right") - 1, 0, len(self.labels) - 1)

    def update(self, pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Add one window's valid pixels (metres) to the bin of their reference height; predictions are also
        counted in the bin of their own height (``n_pred``)."""
        pred, ref = _select(pred, ref, valid)
        err = pred - ref
        k = len(self.labels)
        idx = self._bin(ref)
        self.n += np.bincount(idx, minlength=k)
        self.n_pred += np.bincount(self._bin(pred), minlength=k)
        self.abs_sum += np.bincount(idx, np.abs(err), minlength=k)
        self.sq_sum += np.bincount(idx, err * err, minlength=k)
        self.err_sum += np.bincount(idx, err, minlength=k)
        self.nmae_sum += np.bincount(idx, np.abs(err) / (1 + np.abs(ref)), minlength=k)

    def result(self) -> dict[str, dict[str, Any]]:
        """``{bin label: {n, n_pred, mae, rmse, bias, error_std, nmae}}`` (metres; NaN for empty bins)."""
        out = {}
        for i, label in enumerate(self.labels):
            n = int(self.n[i])
            nan = float("nan")
            mean_err = self.err_sum[i] / n if n else nan
            out[label] = {
                "n": n,
                "n_pred": int(self.n_pred[i]),
                "mae": self.abs_sum[i] / n if n else nan,
                "rmse": math.sqrt(self.sq_sum[i] / n) if n else nan,
                "bias": mean_err,
                "error_std": math.sqrt(max(0.0, self.sq_sum[i] / n - mean_err**2)) if n else nan,
                "nmae": self.nmae_sum[i] / n if n else nan,
            }
        return out


class CoverIoU:
    """Tree-cover IoU at one height threshold: ``|A and B| / (|A or B| + 1)`` with cover = ``height > threshold``."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.intersection = 0
        self.union = 0

    def update(self, pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Count one window's valid pixels into the intersection and union of the two cover masks."""
        pred, ref = _select(pred, ref, valid)
        a, b = pred > self.threshold, ref > self.threshold
        self.intersection += int((a & b).sum())
        self.union += int((a | b).sum())

    def result(self) -> float:
        """``intersection / (union + 1)``; the +1 (Open-Canopy) makes two cover-free maps score 0, not NaN."""
        return self.intersection / (self.union + 1)


class CanopyMetrics:
    """Every metric of this module at once; ``result()`` has the keys of ``metrics.json``.

    Pixel metrics come from :meth:`update`; block R² from :meth:`update_blocks` (call it with block-aligned
    images) or, when ``blocks_from_updates`` is set, from every :meth:`update` call treated as one image.
    """

    def __init__(
        self,
        *,
        bins: Sequence[float] = HEIGHT_BINS,
        iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
        block: int = 50,
        trim: int = 3,
        blocks_from_updates: bool = True,
    ) -> None:
        self.regression = RegressionAccumulator()
        self.blocks = BlockR2(block, trim)
        self.binned = BinnedErrors(bins)
        self.ious = {t: CoverIoU(t) for t in iou_thresholds}
        self.blocks_from_updates = blocks_from_updates

    def update(self, pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Feed one window (``H x W`` metres) to every pixel metric, and to block R² when ``blocks_from_updates``."""
        self.regression.update(pred, ref, valid)
        self.binned.update(pred, ref, valid)
        for iou in self.ious.values():
            iou.update(pred, ref, valid)
        if self.blocks_from_updates:
            self.blocks.update(pred, ref, valid)

    def update_blocks(
        self, pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None = None, *, trim: int | None = None
    ) -> None:
        """Feed one block-aligned image to block R² only; ``trim`` as in :meth:`BlockR2.update`."""
        self.blocks.update(pred, ref, valid, trim=trim)

    def result(self) -> dict[str, Any]:
        """Every metric as one flat dict (the ``metrics.json`` keys): mae, rmse, r2, block_r2, bias, nmae,
        per_bin, ``iou_<t>m`` per threshold, n_pixels, n_blocks, error_std, block_size, block_trim."""
        reg = self.regression.result()
        out: dict[str, Any] = {k: reg[k] for k in ("mae", "rmse", "r2")}
        out["block_r2"] = self.blocks.result()
        out.update(bias=reg["bias"], nmae=reg["nmae"], per_bin=self.binned.result())
        for threshold, iou in self.ious.items():
            out[f"iou_{threshold:g}m"] = iou.result()
        out.update(
            n_pixels=reg["n_pixels"],
            n_blocks=self.blocks.n_blocks,
            error_std=reg["error_std"],
            block_size=self.blocks.block,
            block_trim=self.blocks.trim,
        )
        return out
