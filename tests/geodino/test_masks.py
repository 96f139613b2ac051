"""Nodata as GDAL means it: the dataset mask (per-dataset mask, alpha band, or nodata only where every band is
nodata), exactly as rasterio's ``dataset_mask()``; never "any band equals the nodata value"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp
from rasterio.windows import Window

from geodino.raster import RasterSource

OSBS = Path(__file__).parents[1] / "data" / "real" / "OSBS_029.tif"


def write(path: Path, data: np.ndarray, **profile: object) -> Path:
    base = {
        "driver": "GTiff",
        "count": data.shape[0],
        "height": data.shape[1],
        "width": data.shape[2],
        "dtype": data.dtype,
        "crs": "EPSG:32617",
        "transform": rasterio.Affine(0.5, 0, 400000, 0, -0.5, 3290000),
    }
    with rasterio.open(path, "w", **(base | profile)) as dst:
        dst.write(data)
    return path


def test_a_pixel_where_one_band_equals_nodata_and_the_others_are_valid_is_valid_as_in_dataset_mask(
    tmp_path: Path,
) -> None:
    data = np.full((3, 4, 5), 120, np.uint8)
    data[:, 0, 0] = 255  # every band nodata: a hole
    data[0, 0, 1] = 255  # saturated red only: a colour
    data[:2, 0, 2] = 255  # two of three bands at 255: still a colour
    path = write(tmp_path / "rgb.tif", data, nodata=255)
    with RasterSource(path) as src, rasterio.open(path) as ds:
        _, valid = src.read(Window(0, 0, 5, 4))
        _, decimated = src.read_decimated(20)
        expected = ds.dataset_mask() > 0
    assert not valid[0, 0] and valid[0, 1] and valid[0, 2] and valid.sum() == 19
    np.testing.assert_array_equal(valid, expected)
    np.testing.assert_array_equal(decimated, expected)

    with RasterSource(OSBS) as src, rasterio.open(OSBS) as ds:  # the real orthophoto: 1,665 pixels change sides
        _, valid = src.read(Window(0, 0, src.width, src.height))
        np.testing.assert_array_equal(valid, ds.dataset_mask() > 0)
        assert (~valid).sum() == 461 and ((ds.read() == 255).any(axis=0) & valid).sum() == 1665
        assert src.mask_kind == "nodata value 255 (in every band)"


def test_an_internal_mask_decides_over_the_nodata_value(tmp_path: Path) -> None:
    data = np.full((3, 8, 8), 255, np.uint8)  # every pixel "nodata" by value...
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 1:7] = 255  # ...but the internal mask says these are valid
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        path = write(tmp_path / "masked.tif", data, nodata=255)
        with rasterio.open(path, "r+") as dst:
            dst.write_mask(mask)
    with RasterSource(path) as src, rasterio.open(path) as ds:
        _, valid = src.read(Window(0, 0, 8, 8))
        assert src.mask_kind == "per-dataset mask"
        np.testing.assert_array_equal(valid, ds.dataset_mask() > 0)
    np.testing.assert_array_equal(valid, mask > 0)


def test_an_alpha_band_is_the_mask_and_is_not_fed_as_imagery(tmp_path: Path) -> None:
    data = np.full((4, 6, 6), 90, np.uint8)
    data[3] = 255
    data[3, :, :2] = 0  # transparent columns
    path = write(tmp_path / "rgba.tif", data, photometric="RGB")
    with rasterio.open(path, "r+") as dst:
        dst.colorinterp = (ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha)
    with RasterSource(path) as src, rasterio.open(path) as ds:
        assert src.indexes == [1, 2, 3] and src.band_names == ["red", "green", "blue"] and src.count == 3
        assert src.mask_kind == "alpha band 4"
        _, valid = src.read(Window(0, 0, 6, 6))
        np.testing.assert_array_equal(valid, ds.dataset_mask() > 0)
    assert not valid[:, :2].any() and valid[:, 2:].all()


def test_nan_in_any_band_is_never_fed_and_no_nodata_means_all_valid(tmp_path: Path) -> None:
    data = np.ones((2, 3, 3), np.float32)
    data[1, 1, 1] = np.nan
    path = write(tmp_path / "float.tif", data)
    with RasterSource(path) as src:
        _, valid = src.read(Window(0, 0, 3, 3))
        assert src.mask_kind == "none (every pixel valid)"
    assert valid.sum() == 8 and not valid[1, 1]
