"""Training chips (spatial-block splits, nodata filtering) and GeoTIFF windows for SSL pretraining."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from torch.utils.data import DataLoader

from core.errors import DinoscopeError
from geodino.chips import make_chip_dataset
from geodino.normalise import BandNormaliser
from geodino.pretrain_data import GeoTiffWindows, build_geotiff_dataset
from geodino.raster import RasterSource
from geodino.synthetic import make_forest

REAL = Path(__file__).parents[1] / "data" / "real"


@pytest.fixture(scope="module")
def forests(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Path]]:
    """Two scenes on the same UTM footprint (overlapping rasters share one block grid)."""
    root = tmp_path_factory.mktemp("forests")
    return [make_forest(root, size=256, seed=seed, nodata_fraction=0.1) for seed in (0, 1)]


def _boxes(dataset: object) -> np.ndarray:
    return np.array([dataset.chip_bounds(i) for i in range(len(dataset))])


def test_train_and_val_footprints_never_overlap(forests: list[tuple[Path, Path]]) -> None:
    kwargs = {"chip_size": 32, "stride": 16, "block_size": 64, "val_fraction": 0.3, "seed": 5}
    train = make_chip_dataset(forests, split="train", **kwargs)
    val = make_chip_dataset(forests, split="val", **kwargs)
    everything = make_chip_dataset(forests, split="train", **{**kwargs, "val_fraction": 0.0})
    assert len(train) > 0 and len(val) > 0
    assert sorted(train.chips + val.chips) == sorted(everything.chips)  # every chip in exactly one split
    tr, va = _boxes(train), _boxes(val)
    overlap_x = np.minimum(tr[:, None, 2], va[None, :, 2]) - np.maximum(tr[:, None, 0], va[None, :, 0])
    overlap_y = np.minimum(tr[:, None, 3], va[None, :, 3]) - np.maximum(tr[:, None, 1], va[None, :, 1])
    assert not ((overlap_x > 1e-6) & (overlap_y > 1e-6)).any()
    # Both scenes cover the same ground, so each block is in the same split for both files.
    assert {pair for pair, _, _ in train.chips} == {0, 1} and {pair for pair, _, _ in val.chips} == {0, 1}
    assert np.array_equal(train.normaliser.offset, val.normaliser.offset)
    again = make_chip_dataset(forests, split="val", **kwargs)
    assert again.chips == val.chips
    other = make_chip_dataset(forests, split="val", **{**kwargs, "seed": 6})
    assert other.chips != val.chips


def test_items_are_normalised_images_metre_targets_and_masks(forests: list[tuple[Path, Path]]) -> None:
    train = make_chip_dataset(forests, chip_size=32, split="train", block_size=64, val_fraction=0.3)
    image, target, valid = train[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert target.shape == valid.shape == (32, 32) and target.dtype == torch.float32 and valid.dtype == torch.bool
    pair, window = train.chip_window(3)
    assert window.col_off + 32 <= 256 and window.row_off + 32 <= 256
    with rasterio.open(forests[pair][0]) as rgb, rasterio.open(forests[pair][1]) as chm:
        raw = rgb.read(window=window).astype(np.float32)
        heights = chm.read(1, window=window)
    expected_valid = np.isfinite(heights) & ~(raw == 255).any(axis=0)
    np.testing.assert_array_equal(valid.numpy(), expected_valid)
    np.testing.assert_array_equal(target.numpy()[expected_valid], heights[expected_valid])
    assert (target.numpy()[~expected_valid] == 0).all()
    image_valid = ~(raw == 255).any(axis=0)
    np.testing.assert_allclose(image.numpy(), train.normaliser(raw, valid=image_valid), rtol=1e-6)
    batch = next(iter(DataLoader(train, batch_size=4)))
    assert [t.shape for t in batch] == [(4, 3, 32, 32), (4, 32, 32), (4, 32, 32)]


def test_mostly_nodata_chips_are_skipped(forests: list[tuple[Path, Path]]) -> None:
    strict = make_chip_dataset(
        forests, chip_size=32, split="train", block_size=64, val_fraction=0.0, max_nodata_fraction=0.05
    )
    loose = make_chip_dataset(
        forests, chip_size=32, split="train", block_size=64, val_fraction=0.0, max_nodata_fraction=1.0
    )
    assert len(loose) == 2 * (256 // 32) ** 2 and len(strict) < len(loose)
    worst = max(1.0 - strict[i][2].float().mean().item() for i in range(len(strict)))
    assert worst <= 0.05
    # The CHM's nodata strip covers the first ~26 columns: no strict chip starts there.
    assert all(col >= 32 for _, col, _ in strict.chips)


def test_chips_on_a_real_target_from_another_grid_are_valid_only_inside_it() -> None:
    pairs = [(REAL / "rmnp-rgb.tif", REAL / "rmnp-dem.tif")]
    chips = make_chip_dataset(
        pairs, chip_size=64, split="train", block_size=128, val_fraction=0.0, max_nodata_fraction=0.5
    )
    with rasterio.open(REAL / "rmnp-dem.tif") as dem:
        dem_bounds = dem.bounds
    for i in range(len(chips)):
        left, bottom, right, top = chips.chip_bounds(i)
        overlap = (min(right, dem_bounds.right) - max(left, dem_bounds.left)) * (
            min(top, dem_bounds.top) - max(bottom, dem_bounds.bottom)
        )
        assert overlap >= 0.45 * (right - left) * (top - bottom)
        _, target, valid = chips[i]
        heights = target[valid]
        assert heights.min() >= 2281 - 1 and heights.max() <= 4261 + 1
    assert 0 < len(chips) < (485 // 64) * (373 // 64)


def test_pickled_chip_dataset_gives_the_same_items(forests: list[tuple[Path, Path]]) -> None:
    train = make_chip_dataset(forests[:1], chip_size=32, split="train", block_size=64, val_fraction=0.3)
    clone = pickle.loads(pickle.dumps(train))
    for a, b in zip(train[0], clone[0], strict=False):
        assert torch.equal(a, b)


def test_chip_arguments_are_validated(forests: list[tuple[Path, Path]]) -> None:
    with pytest.raises(DinoscopeError, match="no usable val chips"):
        make_chip_dataset(forests, chip_size=32, split="val", val_fraction=0.0)
    with pytest.raises(DinoscopeError, match="block_size 16 is smaller than chip_size 32"):
        make_chip_dataset(forests, chip_size=32, block_size=16)
    with pytest.raises(DinoscopeError, match="unknown split 'test'"):
        make_chip_dataset(forests, chip_size=32, split="test")
    with pytest.raises(DinoscopeError, match="the first image .* expects 3 bands but 1 are selected"):
        make_chip_dataset([forests[0], (forests[1][1], forests[1][1])], chip_size=32)
    with pytest.raises(DinoscopeError, match="normaliser has 2 bands but 3"):
        make_chip_dataset(forests, chip_size=32, normaliser=BandNormaliser.from_recipe([0, 0], [1, 1]))


# -- GeoTiffWindows ------------------------------------------------------------------------------------------
def _constant(path: Path, size: int, value: int, nodata_cols: int = 0) -> Path:
    data = np.full((2, size, size), value, np.uint8)
    data[:, :, :nodata_cols] = 0
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=size,
        height=size,
        count=2,
        dtype="uint8",
        nodata=0,
        crs="EPSG:32617",
        transform=Affine(1, 0, 400000, 0, -1, 3290000),
    ) as dst:
        dst.write(data)
    return path


def test_windows_are_hwc_float_in_unit_range_with_global_scaling(forests: list[tuple[Path, Path]]) -> None:
    windows = GeoTiffWindows([rgb for rgb, _ in forests], window_size=48, length=20, seed=3)
    assert len(windows) == 20 and windows.channel_names == ["red", "green", "blue"]
    item = windows[7]
    assert item.shape == (48, 48, 3) and item.dtype == np.float32
    assert item.min() >= 0.0 and item.max() <= 1.0
    path, window = windows.locate(7)
    with RasterSource(path) as src:
        raw, valid = src.read(window)
        scale = BandNormaliser.from_percentiles(src)  # whole-raster constants, not this window's
    expected = np.clip(scale(raw, valid=valid), 0, 1).transpose(1, 2, 0)
    np.testing.assert_allclose(item, expected, rtol=1e-6)
    np.testing.assert_array_equal(windows[7], item)  # reproducible
    windows.set_epoch(1)
    assert not np.array_equal(windows[7], item)
    single = GeoTiffWindows(forests[0][0], window_size=16, bands=["green"], length=2)
    assert single[0].shape == (16, 16, 1) and single.channel_names == ["green"]


def test_files_are_sampled_by_area(tmp_path: Path) -> None:
    small = _constant(tmp_path / "small.tif", 48, 50)
    large = _constant(tmp_path / "large.tif", 96, 200)
    windows = GeoTiffWindows(
        [small, large], window_size=16, length=400, normaliser=BandNormaliser.from_dtype("uint8", 2)
    )
    np.testing.assert_allclose(windows.weights, np.array([33**2, 81**2]) / (33**2 + 81**2))
    items = np.stack([windows[i] for i in range(400)])
    from_large = np.isclose(items.max(axis=(1, 2, 3)), 200 / 255)
    assert abs(from_large.mean() - windows.weights[1]) < 0.06  # about 0.86; 3 binomial sigmas is 0.05
    clone = pickle.loads(pickle.dumps(windows))
    np.testing.assert_array_equal(clone[5], items[5])


def test_windows_with_too_much_nodata_are_redrawn(tmp_path: Path) -> None:
    half_empty = _constant(tmp_path / "half.tif", 96, 120, nodata_cols=48)
    strict = GeoTiffWindows(
        half_empty,
        window_size=16,
        length=100,
        max_nodata_fraction=0.0,
        normaliser=BandNormaliser.from_dtype("uint8", 2),
    )
    assert all((strict[i] > 0).all() for i in range(100))  # zeros would be nodata pixels
    assert all(strict.locate(i)[1].col_off >= 48 for i in range(100))
    loose = GeoTiffWindows(
        half_empty,
        window_size=16,
        length=100,
        max_nodata_fraction=1.0,
        normaliser=BandNormaliser.from_dtype("uint8", 2),
    )
    assert any((loose[i] == 0).any() for i in range(100))


def test_factory_expands_globs_and_rejects_bad_input(tmp_path: Path) -> None:
    for name in ("a.tif", "b.tif"):
        _constant(tmp_path / name, 32, 100)
    dataset = build_geotiff_dataset(
        paths=str(tmp_path / "*.tif"), window_size=16, length=4, normaliser={"offset": [0, 0], "scale": [255, 255]}
    )
    assert [p.name for p in dataset.paths] == ["a.tif", "b.tif"] and dataset[0].shape == (16, 16, 2)
    assert [p.name for p in build_geotiff_dataset(paths=tmp_path, window_size=8).paths] == ["a.tif", "b.tif"]
    with pytest.raises(DinoscopeError, match="unknown keys \\['crop'\\]"):
        build_geotiff_dataset(paths=str(tmp_path), window_size=16, crop=3)
    with pytest.raises(DinoscopeError, match="no raster files found"):
        build_geotiff_dataset(paths=str(tmp_path / "*.jp2"), window_size=16)
    rgb = REAL / "OSBS_029.tif"
    with pytest.raises(DinoscopeError, match="the first file .* expects 2 bands but 3"):
        GeoTiffWindows([tmp_path / "a.tif", rgb], window_size=16)
