"""Synthetic forests: deterministic, valid GeoTIFFs, allometric crowns, and height-dependent shadows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio

from geodino.synthetic import (
    RGB_NODATA,
    Trees,
    allometric_radius,
    canopy_height,
    cast_shadows,
    forest_scene,
    make_forest,
)


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    first = make_forest(tmp_path / "a", size=128, seed=7)
    again = make_forest(tmp_path / "b", size=128, seed=7)
    other = make_forest(tmp_path / "c", size=128, seed=8)
    for one, two in zip(first, again, strict=False):
        np.testing.assert_array_equal(_read(one), _read(two))
    assert not np.array_equal(_read(first[0]), _read(other[0]))
    assert not np.array_equal(np.nan_to_num(_read(first[1])), np.nan_to_num(_read(other[1])))


def test_files_share_a_tiled_compressed_projected_grid(tmp_path: Path) -> None:
    rgb_path, chm_path = make_forest(tmp_path, size=256, seed=0, res=0.5, nodata_fraction=0.1)
    with rasterio.open(rgb_path) as rgb, rasterio.open(chm_path) as chm:
        assert (rgb.count, rgb.dtypes[0], rgb.nodata) == (3, "uint8", RGB_NODATA)
        assert (chm.count, chm.dtypes[0]) == (1, "float32") and np.isnan(chm.nodata)
        assert rgb.crs.to_epsg() == chm.crs.to_epsg() == 32617 and rgb.transform == chm.transform
        assert rgb.res == (0.5, 0.5) and rgb.shape == chm.shape == (256, 256)
        for src in (rgb, chm):
            assert src.profile["tiled"] and src.compression.name == "deflate"
        assert chm.tags()["units"] == "m" and rgb.descriptions == ("red", "green", "blue")
        image, heights = rgb.read(), chm.read(1)
    rgb_nodata = (image == RGB_NODATA).all(axis=0)
    assert rgb_nodata.mean() == pytest.approx(0.1, abs=0.01)
    assert np.isnan(heights).mean() == pytest.approx(0.1, abs=0.01)
    assert not (image[:, ~rgb_nodata] == RGB_NODATA).any()  # 255 only ever means nodata
    valid = heights[np.isfinite(heights)]
    assert valid.min() == 0.0 and 20 < valid.max() <= 40.0


def test_crowns_follow_allometry_and_have_positive_height() -> None:
    scene = forest_scene(size=256, seed=3, nodata_fraction=0.0)
    trees = scene.trees
    assert trees.height.min() >= 2.0 and trees.height.max() <= 40.0 and trees.height.size > 100
    assert np.corrcoef(trees.height, trees.radius)[0, 1] > 0.9
    assert np.all(np.diff(allometric_radius(np.array([2.0, 10.0, 20.0, 40.0]))) > 0)
    # At every stem the canopy is at least that tree's crown-edge height, and the tallest top is reached.
    rows, cols = trees.row.astype(int), trees.col.astype(int)
    assert np.all(scene.chm[rows, cols] >= 0.5 * trees.height)
    assert scene.chm.max() == pytest.approx(trees.height.max(), rel=0.02)
    crown_cover = (scene.chm > 0).mean()
    assert 0.2 < crown_cover < 0.9  # gaps and open ground remain


def test_taller_trees_cast_longer_shadows() -> None:
    size, res, elevation = 200, 0.5, 45.0
    lengths = {}
    for height in (10.0, 30.0):
        trees = Trees(col=np.array([150.0]), row=np.array([150.0]), height=np.array([height]), radius=np.array([2.0]))
        chm, _ = canopy_height(trees, size, res)
        shadow = cast_shadows(chm, res, sun_elevation=elevation, sun_azimuth=135.0) & (chm == 0)
        rows, cols = np.nonzero(shadow)
        # Sun in the south-east: the shadow falls north-west; measure its reach from the stem.
        lengths[height] = float(np.max(np.hypot(rows - 150, cols - 150))) * res
    assert lengths[30.0] > 2.5 * lengths[10.0]
    for height, length in lengths.items():
        assert length == pytest.approx(height / math.tan(math.radians(elevation)), rel=0.15)


def test_shadows_darken_the_image() -> None:
    scene = forest_scene(size=256, seed=1, nodata_fraction=0.0)
    brightness = scene.rgb.astype(float).mean(axis=0)
    ground = scene.chm == 0
    assert 0.05 < scene.shadow.mean() < 0.7
    assert brightness[ground & scene.shadow].mean() < 0.6 * brightness[ground & ~scene.shadow].mean()
