"""RasterSource (windowed, nodata-aware reads, clear errors) and BandNormaliser (scene-level scaling)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from core.errors import DinoscopeError
from geodino.normalise import BandNormaliser
from geodino.raster import RasterSource, check_band_count, grid_windows

REAL = Path(__file__).parents[1] / "data" / "real"
OSBS = REAL / "OSBS_029.tif"


def _write(path: Path, data: np.ndarray, **profile: object) -> Path:
    base = {
        "driver": "GTiff",
        "count": data.shape[0],
        "height": data.shape[1],
        "width": data.shape[2],
        "dtype": data.dtype,
        "crs": "EPSG:32617",
        "transform": Affine(1, 0, 400000, 0, -1, 3290000),
    }
    base.update(profile)
    with rasterio.open(path, "w", **base) as dst:
        dst.write(data)
    return path


def test_real_osbs_metadata_and_window_match_rasterio() -> None:
    with RasterSource(OSBS) as src, rasterio.open(OSBS) as ref:
        assert (src.count, src.width, src.height, src.dtype, src.nodata) == (3, 400, 400, "uint8", 255)
        assert src.crs.to_epsg() == 32617 and src.res == pytest.approx((0.1, 0.1))
        assert src.band_names == ["red", "green", "blue"] and src.transform == ref.transform
        window = Window(0, 300, 120, 100)  # bottom rows hold the nodata (255) pixels
        data, valid = src.read(window)
        raw = ref.read(window=window)
        dataset_mask = ref.dataset_mask(window=window) > 0
    assert data.dtype == np.float32 and data.shape == (3, 100, 120) and valid.shape == (100, 120)
    np.testing.assert_array_equal(data, raw.astype(np.float32))
    np.testing.assert_array_equal(valid, dataset_mask)  # GDAL's dataset mask: nodata only where every band is 255
    assert 0 < (~valid).sum() < valid.size


def test_boundless_read_pads_outside_as_invalid_and_clipped_read_does_not() -> None:
    with RasterSource(OSBS) as src, rasterio.open(OSBS) as ref:
        data, valid = src.read(Window(-10, -5, 30, 30))
        assert data.shape == (3, 30, 30)
        assert not valid[:5].any() and not valid[:, :10].any()
        np.testing.assert_array_equal(data[:, 5:, 10:], ref.read(window=Window(0, 0, 20, 25)))
        assert (data[:, :5] == 0).all()
        clipped, clipped_valid = src.read(Window(390, 390, 30, 30), boundless=False)
        assert clipped.shape == (3, 10, 10) and clipped_valid.shape == (10, 10)
        _, far_valid = src.read(Window(1000, 1000, 8, 8))
        assert far_valid.shape == (8, 8) and not far_valid.any()


def test_bands_selected_by_index_and_by_name_in_the_requested_order(tmp_path: Path) -> None:
    data = np.stack([np.full((8, 8), v, np.uint16) for v in (10, 20, 30)])
    path = _write(tmp_path / "three.tif", data)
    with rasterio.open(path, "r+") as dst:
        dst.descriptions = ("blue", "red", "nir")
    with RasterSource(path, bands=["NIR", 1]) as src:
        assert src.indexes == [3, 1] and src.band_names == ["nir", "blue"] and src.count == 2
        values, _ = src.read(Window(0, 0, 4, 4))
    assert values[0, 0, 0] == 30 and values[1, 0, 0] == 10
    with RasterSource(OSBS, bands=["blue"]) as src:  # colour interpretation when there is no description
        assert src.indexes == [3]


def test_bad_bands_raise_naming_the_file_and_the_available_bands() -> None:
    with pytest.raises(DinoscopeError, match="unknown band name 'nir'") as err:
        RasterSource(OSBS, bands=["red", "nir"])
    assert str(OSBS) in str(err.value) and "1=red, 2=green, 3=blue" in str(err.value)
    assert err.value.field == "bands"
    with pytest.raises(DinoscopeError, match="band index 4 is out of range"):
        RasterSource(OSBS, bands=[4])
    with pytest.raises(DinoscopeError, match="band index 0"):
        RasterSource(OSBS, bands=[0])


def test_check_band_count_explains_the_mismatch() -> None:
    with RasterSource(OSBS) as src:
        check_band_count(src, 3)
        with pytest.raises(DinoscopeError, match="expects 4 bands but 3 are selected") as err:
            check_band_count(src, 4)
    assert err.value.field == "bands" and err.value.path == str(OSBS)


def test_missing_file_and_non_raster_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DinoscopeError, match="file not found") as err:
        RasterSource(tmp_path / "nope.tif")
    assert err.value.path.endswith("nope.tif") and err.value.field == "path"
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all " * 20)
    with pytest.raises(DinoscopeError, match="not a readable raster") as err:
        RasterSource(junk)
    assert "corrupt" in err.value.fix
    with pytest.raises(DinoscopeError, match="directory"):
        RasterSource(tmp_path)


def test_truncated_real_tiff_fails_with_a_clear_message(tmp_path: Path) -> None:
    cut = tmp_path / "half.tif"
    blob = OSBS.read_bytes()
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DinoscopeError) as err, RasterSource(cut) as src:
        src.read(Window(0, 350, 400, 50))  # the strips at the bottom are past the cut
    message = str(err.value)
    assert str(cut) in message and "truncated or corrupt" in message


def test_nan_alpha_and_internal_masks_make_pixels_invalid(tmp_path: Path) -> None:
    floats = np.ones((2, 6, 6), np.float32)
    floats[1, 2, 3] = np.nan
    with RasterSource(_write(tmp_path / "nan.tif", floats)) as src:
        _, valid = src.read(Window(0, 0, 6, 6))
    assert valid.sum() == 35 and not valid[2, 3]

    rgba = np.full((4, 6, 6), 100, np.uint8)
    rgba[3, :, :2] = 0  # transparent columns
    path = _write(tmp_path / "rgba.tif", rgba, photometric="RGB", alpha="YES")
    with RasterSource(path, bands=[1, 2, 3]) as src:
        _, valid = src.read(Window(0, 0, 6, 6))
    assert not valid[:, :2].any() and valid[:, 2:].all()

    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        path = _write(tmp_path / "masked.tif", np.full((1, 6, 6), 5, np.uint8))
        with rasterio.open(path, "r+") as dst:
            mask = np.full((6, 6), 255, np.uint8)
            mask[4:] = 0
            dst.write_mask(mask)
    with RasterSource(path) as src:
        _, valid = src.read(Window(0, 0, 6, 6))
    assert not valid[4:].any() and valid[:4].all()


def test_pickled_source_reopens_the_file() -> None:
    with RasterSource(OSBS, bands=["green"]) as src:
        clone = pickle.loads(pickle.dumps(src))
        expected, _ = src.read(Window(5, 5, 10, 10))
    with clone:
        np.testing.assert_array_equal(clone.read(Window(5, 5, 10, 10))[0], expected)
        assert clone.band_names == ["green"]


def test_decimated_read_is_bounded_and_grid_windows_cover_the_grid() -> None:
    with RasterSource(OSBS) as src:
        data, valid = src.read_decimated(max_pixels=2_500)
    assert data.shape[0] == 3 and data.shape[1] * data.shape[2] <= 2_500 and valid.shape == data.shape[1:]
    windows = list(grid_windows(100, 70, 32))
    assert len(windows) == 4 * 3 and sum(w.width * w.height for w in windows) == 100 * 70


# -- BandNormaliser -----------------------------------------------------------------------------------------
def test_weights_meta_normalisation_matches_scaling_then_mean_std() -> None:
    mean, std = [0.420, 0.411, 0.296], [0.213, 0.156, 0.143]
    norm = BandNormaliser.from_weights_meta(mean, std, dtype_max=255)
    raw = np.random.default_rng(0).integers(0, 255, (3, 5, 7)).astype(np.float32)
    expected = (raw / 255 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    out = norm(raw)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    valid = np.ones((5, 7), bool)
    valid[0, 0] = False
    assert (norm(raw, valid=valid)[:, 0, 0] == 0).all()


def test_normaliser_round_trips_through_json_and_rejects_bad_input() -> None:
    norm = BandNormaliser.from_recipe([100.0, 200.0], [10.0, 20.0], band_names=["red", "nir"])
    again = BandNormaliser.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert again == norm and again.method == "recipe"
    np.testing.assert_allclose(again(np.full((2, 1, 1), 120.0, np.float32)).ravel(), [2.0, -4.0])
    with pytest.raises(DinoscopeError, match="unknown keys"):
        BandNormaliser.from_dict({"offset": [0], "scale": [1], "mean": [0]})
    with pytest.raises(DinoscopeError, match="positive"):
        BandNormaliser([0.0], [0.0])
    with pytest.raises(DinoscopeError, match="for 2 bands"):
        norm(np.zeros((3, 2, 2), np.float32))


def test_percentiles_are_global_and_ignore_nodata(tmp_path: Path) -> None:
    with RasterSource(OSBS) as src, rasterio.open(OSBS) as ref:
        norm = BandNormaliser.from_percentiles(src, low=2, high=98, max_pixels=40_000)
        full = ref.read()
        valid = ref.dataset_mask() > 0
    expected_low, expected_high = np.percentile(full[:, valid].astype(np.float64), [2, 98], axis=1)
    # A 4x decimated sample estimates the full-resolution percentiles to within a few grey levels.
    np.testing.assert_allclose(norm.offset, expected_low, atol=4)
    np.testing.assert_allclose(norm.offset + norm.scale, expected_high, atol=4)
    assert norm.band_names == ["red", "green", "blue"]

    values = np.tile(np.linspace(10, 110, 64, dtype=np.float32), (1, 64, 1))
    values[:, :40] = -9999  # a large nodata area must not drag the low percentile down
    path = _write(tmp_path / "nd.tif", values, nodata=-9999)
    with RasterSource(path) as src:
        norm = BandNormaliser.from_percentiles(src, low=0, high=100)
    assert norm.offset[0] == pytest.approx(10) and norm.scale[0] == pytest.approx(100)


def test_percentiles_fail_clearly_without_valid_pixels(tmp_path: Path) -> None:
    path = _write(tmp_path / "empty.tif", np.zeros((1, 8, 8), np.uint8), nodata=0)
    with RasterSource(path) as src, pytest.raises(DinoscopeError, match="no valid pixels"):
        BandNormaliser.from_percentiles(src)


def test_real_geographic_rgb_reads_with_its_nodata() -> None:
    with RasterSource(REAL / "rmnp-rgb.tif") as src:
        assert src.crs.to_epsg() == 4326 and (src.width, src.height) == (485, 373)
        data, valid = src.read(Window(0, 0, 485, 373))
    assert (data[:, ~valid] == 255).any(axis=0).all() and valid.mean() > 0.9
