"""Streaming canopy metrics against hand-computed values and direct numpy/torch computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geodino.metrics import BinnedErrors, BlockR2, CanopyMetrics, CoverIoU, RegressionAccumulator, block_means


def test_regression_metrics_match_hand_computed_values() -> None:
    acc = RegressionAccumulator()
    acc.update(np.array([1.0, 2, 3, 4]), np.array([1.0, 1, 5, 2]))
    r = acc.result()
    # errors 0, 1, -2, 2
    assert r["mae"] == pytest.approx(1.25)
    assert r["rmse"] == pytest.approx(1.5)
    assert r["bias"] == pytest.approx(0.25)
    assert r["r2"] == pytest.approx(1 - 9 / 10.75)  # ref mean 2.25, SST 10.75, SSE 9
    assert r["n_pixels"] == 4


def test_streaming_equals_one_shot_and_excludes_invalid_and_nan() -> None:
    rng = np.random.default_rng(1)
    pred = rng.gamma(2, 6, (64, 80))
    ref = pred + rng.normal(0, 3, pred.shape)
    valid = rng.random(pred.shape) > 0.1
    pred[5, 5] = np.nan
    keep = valid & np.isfinite(pred)
    err = pred[keep] - ref[keep]
    chunks = RegressionAccumulator()
    for rows in np.array_split(np.arange(64), 7):
        chunks.update(pred[rows], ref[rows], valid[rows])
    r = chunks.result()
    assert r["n_pixels"] == keep.sum()
    assert r["mae"] == pytest.approx(np.abs(err).mean())
    assert r["rmse"] == pytest.approx(np.sqrt((err**2).mean()))
    assert r["bias"] == pytest.approx(err.mean())
    sst = ((ref[keep] - ref[keep].mean()) ** 2).sum()
    assert r["r2"] == pytest.approx(1 - (err**2).sum() / sst)


def test_nmae_leaves_out_reference_below_two_metres() -> None:
    acc = RegressionAccumulator()
    acc.update(np.array([2.0, 2, 12]), np.array([1.0, 4, 9]))
    # ref 1 m excluded; |2-4|/(1+4) = 0.4 and |12-9|/(1+9) = 0.3
    assert acc.result()["nmae"] == pytest.approx(0.35)


def test_block_r2_is_hrch_trim_then_50px_average_pooling() -> None:
    rng = np.random.default_rng(2)
    ref = rng.gamma(2, 5, (256, 256)).astype(np.float32)
    pred = ref + rng.normal(0, 4, ref.shape).astype(np.float32)
    block = BlockR2(block=50, trim=3)
    block.update(pred, ref)
    trimmed = [torch.from_numpy(a[3:-3, 3:-3].astype(np.float64))[None, None] for a in (pred, ref)]
    pooled = [torch.nn.functional.avg_pool2d(t, 50).flatten().numpy() for t in trimmed]
    sse = ((pooled[0] - pooled[1]) ** 2).sum()
    sst = ((pooled[1] - pooled[1].mean()) ** 2).sum()
    assert block.n_blocks == 25
    assert block.result() == pytest.approx(1 - sse / sst, rel=1e-9)


def test_block_means_use_valid_pixels_and_skip_mostly_invalid_blocks() -> None:
    values = np.array([[1.0, 3, 10, 10], [5, 7, 10, 10]])
    valid = np.array([[True, True, False, False], [True, False, False, True]])
    means, ok = block_means(values, valid, 2)
    assert means[0, 0] == pytest.approx(3.0)  # (1 + 3 + 5) / 3
    assert ok.tolist() == [[True, False]]  # 1 of 4 valid < 50 %


def test_per_bin_errors_follow_reference_height_bins() -> None:
    ref = np.array([-0.5, 1.0, 3.0, 4.0, 12.0, 25.0, 45.0, 70.0])
    pred = np.array([0.5, 1.0, 5.0, 3.0, 10.0, 30.0, 45.0, 61.0])
    bins = BinnedErrors()
    bins.update(pred, ref)
    r = bins.result()
    assert list(r) == ["0-2", "2-5", "5-10", "10-15", "15-20", "20-30", "30-60", "60+"]
    assert [r[k]["n"] for k in r] == [2, 2, 0, 1, 0, 1, 1, 1]
    assert r["2-5"]["mae"] == pytest.approx(1.5) and r["2-5"]["bias"] == pytest.approx(0.5)
    assert r["2-5"]["rmse"] == pytest.approx(math.sqrt(2.5))
    assert r["0-2"]["bias"] == pytest.approx(0.5)  # negative lidar noise counts in the first bin
    assert r["60+"]["bias"] == pytest.approx(-9.0)
    assert r["5-10"]["n_pred"] == 1 and math.isnan(r["5-10"]["mae"])


def test_cover_iou_uses_strict_threshold_and_plus_one_union() -> None:
    pred, ref = np.array([0.0, 3, 6, 1, 2]), np.array([3.0, 3, 1, 0, 2])
    iou2, iou5 = CoverIoU(2.0), CoverIoU(5.0)
    for acc in (iou2, iou5):
        acc.update(pred, ref)
    assert (iou2.intersection, iou2.union) == (1, 3)  # height exactly 2 m is not cover
    assert iou2.result() == pytest.approx(1 / 4)
    assert iou5.result() == pytest.approx(0.0)


def test_canopy_metrics_report_every_key_of_metrics_json() -> None:
    rng = np.random.default_rng(3)
    ref = rng.gamma(2, 6, (120, 120))
    metrics = CanopyMetrics()
    metrics.update(ref + 1.0, ref)
    r = metrics.result()
    for key in ("mae", "rmse", "r2", "block_r2", "bias", "nmae", "per_bin", "iou_2m", "iou_5m", "n_pixels"):
        assert key in r
    assert r["bias"] == pytest.approx(1.0) and r["mae"] == pytest.approx(1.0) and r["n_pixels"] == 14400
    assert r["n_blocks"] == 4  # (120 - 6) // 50 = 2 blocks per side
