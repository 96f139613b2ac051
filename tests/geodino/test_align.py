"""Targets warped onto an image grid: real RMNP pair (other grid, smaller extent) and a cross-CRS case."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.warp import transform as transform_points
from rasterio.windows import Window

from core.errors import DinoscopeError
from geodino.align import AlignedTarget, align_raster_file, align_to_grid
from geodino.raster import RasterSource

REAL = Path(__file__).parents[1] / "data" / "real"
RGB, DEM = REAL / "rmnp-rgb.tif", REAL / "rmnp-dem.tif"


def _pixel_centres(src: RasterSource) -> tuple[np.ndarray, np.ndarray]:
    cols, rows = np.meshgrid(np.arange(src.width) + 0.5, np.arange(src.height) + 0.5)
    return src.transform @ (cols, rows)


def test_real_dem_lands_on_the_rgb_grid_only_inside_its_footprint() -> None:
    with RasterSource(RGB) as rgb, rasterio.open(DEM) as dem:
        values, valid = align_to_grid(DEM, rgb, resampling="nearest")
        xs, ys = _pixel_centres(rgb)
        bounds, dem_data = dem.bounds, dem.read(1)
        rows, cols = rasterio.transform.rowcol(dem.transform, xs[valid], ys[valid])
    assert values.shape == valid.shape == (373, 485) and values.dtype == np.float32
    half = 0.0015 / 2
    inside = (xs > bounds.left) & (xs < bounds.right) & (ys > bounds.bottom) & (ys < bounds.top)
    deep_inside = (
        (xs > bounds.left + half) & (xs < bounds.right - half) & (ys > bounds.bottom + half) & (ys < bounds.top - half)
    )
    assert not valid[~inside].any()  # nothing outside the DEM, and outside is NaN, never 0
    assert valid[deep_inside].all()
    assert np.isnan(values[~valid]).all() and 0.3 < valid.mean() < 0.5
    # Every valid pixel holds the DEM value found at the same geographic coordinate.
    expected = dem_data[np.clip(rows, 0, 186), np.clip(cols, 0, 151)]
    assert np.mean(values[valid] == expected) > 0.995


def test_real_dem_bilinear_stays_within_neighbouring_dem_values() -> None:
    with RasterSource(RGB) as rgb, rasterio.open(DEM) as dem:
        values, valid = align_to_grid(DEM, rgb, resampling="bilinear")
        xs, ys = _pixel_centres(rgb)
        dem_data = dem.read(1).astype(np.float32)
        inv = ~dem.transform
    fc, fr = inv @ (xs[valid], ys[valid])
    c0 = np.clip(np.floor(fc - 0.5).astype(int), 0, 150)
    r0 = np.clip(np.floor(fr - 0.5).astype(int), 0, 185)
    corners = np.stack([dem_data[r0, c0], dem_data[r0 + 1, c0], dem_data[r0, c0 + 1], dem_data[r0 + 1, c0 + 1]])
    inside = values[valid]
    assert inside.min() >= 2281 and inside.max() <= 4261  # no 65535 nodata leaking in
    assert np.mean((inside >= corners.min(0) - 1) & (inside <= corners.max(0) + 1)) > 0.99


def test_nodata_hole_in_the_target_stays_invalid(tmp_path: Path) -> None:
    holed = Path(shutil.copy(DEM, tmp_path / "holed.tif"))
    with rasterio.open(holed, "r+") as dst:
        data = dst.read(1)
        data[60:120, 40:100] = 65535
        dst.write(data, 1)
        (left, top), (right, bottom) = dst.transform @ (45, 65), dst.transform @ (95, 115)
    with RasterSource(RGB) as rgb:
        values, valid = align_to_grid(holed, rgb)
        xs, ys = _pixel_centres(rgb)
    in_hole = (xs > left) & (xs < right) & (ys > bottom) & (ys < top)
    assert in_hole.sum() > 100 and not valid[in_hole].any()
    assert np.nanmax(values) <= 4261


def test_projected_target_in_another_crs_is_resampled_at_the_right_places(tmp_path: Path) -> None:
    # Target: EPSG:3857, 3 m pixels, values a known linear function of its own coordinates.
    x0, y0 = -9_028_000.0, 3_380_000.0
    cols, rows = np.meshgrid(np.arange(300) + 0.5, np.arange(300) + 0.5)
    tx, ty = x0 + 3 * cols, y0 - 3 * rows
    field = (20 + 0.01 * (tx - x0) - 0.02 * (ty - y0)).astype(np.float32)
    target = tmp_path / "target_3857.tif"
    with rasterio.open(
        target,
        "w",
        driver="GTiff",
        width=300,
        height=300,
        count=1,
        dtype="float32",
        crs="EPSG:3857",
        transform=Affine(3, 0, x0, 0, -3, y0),
        nodata=-9999,
    ) as dst:
        dst.write(field, 1)
    # Image: UTM 17N, 2 m pixels, larger than the target on every side.
    (cx,), (cy,) = transform_points("EPSG:3857", "EPSG:32617", [x0 + 450], [y0 - 450])
    image = tmp_path / "image_utm.tif"
    with rasterio.open(
        image,
        "w",
        driver="GTiff",
        width=700,
        height=700,
        count=3,
        dtype="uint8",
        crs="EPSG:32617",
        transform=Affine(2, 0, cx - 700, 0, -2, cy + 700),
    ) as dst:
        dst.write(np.full((3, 700, 700), 90, np.uint8))
    with RasterSource(image) as like:
        values, valid = align_to_grid(target, like)
        xs, ys = _pixel_centres(like)
    px, py = transform_points("EPSG:32617", "EPSG:3857", xs.ravel(), ys.ravel())
    px, py = np.reshape(px, xs.shape), np.reshape(py, xs.shape)
    margin = 6.0
    deep = (px > x0 + margin) & (px < x0 + 900 - margin) & (py < y0 - margin) & (py > y0 - 900 + margin)
    outside = (px < x0) | (px > x0 + 900) | (py > y0) | (py < y0 - 900)
    assert valid[deep].all() and not valid[outside].any()
    expected = 20 + 0.01 * (px - x0) - 0.02 * (py - y0)
    np.testing.assert_allclose(values[deep], expected[deep], atol=0.02)


def test_window_reads_and_file_output_equal_the_whole_grid_warp(tmp_path: Path) -> None:
    out = tmp_path / "aligned.tif"
    with RasterSource(RGB) as rgb:
        whole, _ = align_to_grid(DEM, rgb)
        part, part_valid = align_to_grid(DEM, rgb, window=Window(100, 50, 64, 48))
        edge, edge_valid = align_to_grid(DEM, rgb, window=Window(470, 360, 30, 30))
    np.testing.assert_array_equal(part, whole[50:98, 100:164])
    assert part_valid.shape == (48, 64) and edge.shape == (30, 30) and not edge_valid[13:, :].any()
    assert align_raster_file(DEM, RGB, out, block_size=64) == out
    with rasterio.open(out) as written, rasterio.open(RGB) as ref:
        assert (written.crs, written.transform, written.shape) == (ref.crs, ref.transform, ref.shape)
        assert written.dtypes[0] == "float32" and np.isnan(written.nodata)
        assert written.profile["tiled"] and written.tags()["resampling"] == "bilinear"
        np.testing.assert_array_equal(written.read(1), whole)  # block-by-block writing leaves no seams
    assert [p.name for p in tmp_path.iterdir()] == ["aligned.tif"]


def test_same_grid_target_is_read_exactly(tmp_path: Path) -> None:
    from geodino.synthetic import make_forest

    rgb_path, chm_path = make_forest(tmp_path, size=64, seed=1)
    with RasterSource(rgb_path) as rgb, AlignedTarget(chm_path, rgb) as target, rasterio.open(chm_path) as chm:
        values, valid = target.read(Window(0, 0, 64, 64))
        np.testing.assert_array_equal(values, chm.read(1))
    assert (valid == np.isfinite(values)).all()


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_alignment_errors_name_the_problem(tmp_path: Path) -> None:
    with RasterSource(RGB) as rgb:
        with pytest.raises(DinoscopeError, match="unknown resampling 'cubicspline'") as err:
            align_to_grid(DEM, rgb, resampling="cubicspline")
        assert "bilinear" in err.value.fix
        with pytest.raises(DinoscopeError, match="file not found"):
            align_to_grid(tmp_path / "missing_chm.tif", rgb)
    no_crs = tmp_path / "no_crs.tif"
    with rasterio.open(no_crs, "w", driver="GTiff", width=4, height=4, count=1, dtype="float32") as dst:
        dst.write(np.ones((1, 4, 4), np.float32))
    with RasterSource(RGB) as rgb, pytest.raises(DinoscopeError, match="no CRS") as err:
        align_to_grid(no_crs, rgb)
    assert err.value.field == "crs"
    far = tmp_path / "far.tif"
    with rasterio.open(
        far,
        "w",
        driver="GTiff",
        width=4,
        height=4,
        count=1,
        dtype="float32",
        crs="EPSG:4326",
        transform=Affine(0.01, 0, 10.0, 0, -0.01, 50.0),
    ) as dst:
        dst.write(np.ones((1, 4, 4), np.float32))
    with pytest.raises(DinoscopeError, match="does not overlap"):
        align_raster_file(far, RGB, tmp_path / "out.tif")
    assert not (tmp_path / "out.tif").exists()
