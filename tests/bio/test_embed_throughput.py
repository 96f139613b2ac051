"""The fast paths of ``dinoscope cells embed`` give what the plain ones give, to the bit: crops cut in one gather,
nucleus areas of a whole batch at once, saturation compared on the clipped channels only, the pinned staging of
host-to-device copies, and the background writer's error and stop handling."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from bio.backbone import stage_batch
from bio.cells import crop_cells
from bio.embed_fields import BackgroundWriter
from bio.qc import measure_cells, nucleus_areas


def _area_one_by_one(plane: np.ndarray) -> float:
    if float(plane.max()) <= float(plane.min()):
        return 0.0
    labels, _ = ndi.label(plane > threshold_otsu(plane))
    cy, cx = plane.shape[0] // 2, plane.shape[1] // 2
    hits = np.bincount(labels[max(cy - 2, 0) : cy + 3, max(cx - 2, 0) : cx + 3].ravel())
    hits[0] = 0
    return float(np.count_nonzero(labels == int(hits.argmax()))) if hits.any() else 0.0


def test_nucleus_areas_of_a_batch_equal_skimage_crop_by_crop() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:33, :33]
    for trial in range(30):
        discs = [100 + 3000 * (((yy - 16 + rng.normal() * 3) ** 2 + (xx - 16) ** 2) <= rng.uniform(1, 20) ** 2)]
        planes = np.stack([d + rng.normal(0, 50 * (trial % 3), d.shape) for d in discs * 6]).astype(np.float32)
        planes[1] = 7  # a flat crop
        planes[2] = rng.integers(0, 3, planes[2].shape) * 2000.0  # ties between components
        want = np.array([_area_one_by_one(p) for p in planes], np.float32)
        np.testing.assert_array_equal(nucleus_areas(planes), want)


def test_crops_cut_in_one_gather_equal_box_by_box_copies() -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 4096, (3, 40, 50)).astype(np.uint16)
    centres = np.concatenate([rng.uniform(-3, 52, (60, 2)), [[np.nan, 3], [20, 20]]])
    for size in (1, 8, 13, 45, 60):
        crops = crop_cells(data, centres, size, pad_value=7)
        for out, i in enumerate(crops.kept):
            cy, cx = np.floor(centres[i] + 0.5).astype(int) - size // 2
            want = np.full((3, size, size), 7, np.uint16)
            for dy in range(size):
                for dx in range(size):
                    if 0 <= cy + dy < 40 and 0 <= cx + dx < 50:
                        want[:, dy, dx] = data[:, cy + dy, cx + dx]
            np.testing.assert_array_equal(crops.crops[out], want)
            assert crops.at_edge[out] == (cy < 0 or cx < 0 or cy + size > 40 or cx + size > 50)


def test_staging_buffer_is_reused_and_changes_no_value() -> None:
    batch = torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2)
    staged, buffer = stage_batch(batch, torch.device("cpu"), None, pin=True)
    assert torch.equal(staged, batch) and buffer is not None
    smaller = batch[:1] + 1
    staged, again = stage_batch(smaller, torch.device("cpu"), buffer, pin=True)
    assert again is buffer and torch.equal(staged, smaller)
    plain, none = stage_batch(batch, torch.device("cpu"), None)  # no CUDA: passed through
    assert plain is batch and none is None


def test_background_writer_writes_in_order_and_hands_errors_back() -> None:
    written: list[int] = []
    writer = BackgroundWriter(written.append)
    for item in range(5):
        writer.put(item)
    writer.close()
    assert written == list(range(5))

    def fail_on_two(item: int) -> None:
        if item == 2:
            raise RuntimeError("disk full")
        written.append(item)

    written.clear()
    writer = BackgroundWriter(fail_on_two, depth=1)
    with pytest.raises(RuntimeError, match="disk full"):
        for item in range(10):
            writer.put(item)
        writer.close()
    assert written == [0, 1]

    gate = threading.Event()
    writer = BackgroundWriter(lambda item: gate.wait(5), depth=1)
    writer.put(0)
    writer.abandon()  # returns at once although a write is stuck
    gate.set()


def test_saturation_compares_only_the_clipped_channels_and_gives_the_full_comparison() -> None:
    rng = np.random.default_rng(2)
    crops = rng.integers(0, 4096, (9, 4, 16, 16)).astype(np.uint16)
    for levels in ([np.inf] * 4, [np.inf, 4000.0, np.inf, 3900.0], [4000.0] * 4):
        levels = np.array(levels)
        want = (crops.astype(np.float32) >= levels.astype(np.float32)[None, :, None, None]).mean(axis=(2, 3)).max(1)
        got = measure_cells(crops, levels, None)["saturated_fraction"]
        np.testing.assert_array_equal(got, want.astype(np.float32))
