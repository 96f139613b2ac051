"""COG overviews computed while a prediction writes its rows: the same levels and the same values as GDAL's own
AVERAGE overviews, whatever the row ranges, and a resumed run that writes the identical file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
import torch
from rasterio.transform import from_origin
from rio_cogeo.cogeo import cog_validate

import geodino.predict as predict
from geodino.overviews import OverviewPyramid, level_rows, overview_factors, overview_ranges, precomputed_levels
from geodino.predict import predict_raster
from geodino.raster import RasterSource
from tests.geodino.test_pipeline import NORM, Identity, write_rgb


def gdal_cog(data: np.ndarray, path: Path) -> Path:
    """``data`` (float32, NaN = nodata) as a COG whose overviews GDAL computed (AVERAGE, 512 blocks)."""
    plain = path.with_suffix(".plain.tif")
    profile = {"driver": "GTiff", "width": data.shape[1], "height": data.shape[0], "count": 1, "dtype": "float32"}
    profile.update(nodata=float("nan"), crs="EPSG:32617", transform=from_origin(0, 0, 1, 1))
    with rasterio.open(plain, "w", **profile) as dst:
        dst.write(data, 1)
    rasterio.shutil.copy(plain, path, driver="COG", blocksize=512, overview_resampling="AVERAGE")
    return path


def levels_of(path: Path) -> list[np.ndarray]:
    with rasterio.open(path) as ds:
        return [ds.read(1, out_shape=(-(-ds.height // f), -(-ds.width // f))) for f in ds.overviews(1)]


@pytest.mark.parametrize("size", [(512, 512), (513, 40), (1024, 300), (1025, 1025), (600, 2049), (2048, 2049)])
def test_the_levels_are_those_gdal_cog_driver_makes(tmp_path: Path, size: tuple[int, int]) -> None:
    width, height = size
    cog = gdal_cog(np.ones((height, width), np.float32), tmp_path / "g.tif")
    with rasterio.open(cog) as ds:
        assert overview_factors(width, height) == ds.overviews(1)


def test_overviews_built_row_range_by_row_range_equal_gdal_average(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = (rng.random((1536, 2048)) * 30).astype(np.float32)
    data[100:300, 50:77] = np.nan  # holes that cover whole 2 x 2 blocks, parts of blocks, and single pixels
    data[rng.random(data.shape) < 0.01] = np.nan
    data[1000:1003, :] = np.nan
    factors = overview_factors(2048, 1536)
    pyramid = OverviewPyramid(2048, 1536, len(factors))
    made: list[list[np.ndarray]] = [[] for _ in factors]
    cuts = [0, 37, 38, 250, 251, 777, 1200, 1536]  # odd and even ranges: pending rows carried between them
    for first, stop in zip(cuts[:-1], cuts[1:], strict=True):
        for level, rows in enumerate(pyramid.add(data[first:stop])):
            made[level].append(rows)
            assert len(pyramid.state()) == len(factors)
        assert [sum(r.shape[0] for r in rows) for rows in made] == level_rows(stop, 1536, len(factors))
    expected = levels_of(gdal_cog(data, tmp_path / "g.tif"))
    assert len(expected) == len(factors) == 2
    for ours, theirs in zip(made, expected, strict=True):
        ours = np.concatenate(ours)
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, equal_nan=True)


def test_a_pyramid_restored_from_its_state_continues_exactly(tmp_path: Path) -> None:
    data = np.random.default_rng(1).random((1101, 1030)).astype(np.float32)
    whole = OverviewPyramid(1030, 1101, 2)
    expected = [whole.add(data[:301]), whole.add(data[301:])]
    first = OverviewPyramid(1030, 1101, 2)
    got = [first.add(data[:301])]
    second = OverviewPyramid(1030, 1101, 2)
    second.restore(first.state(), 301)
    got.append(second.add(data[301:]))
    for a, b in zip(expected, got, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    assert [r.shape for r in got[1]] == [(551 - 150, 515), (276 - 75, 258)]  # the odd last row ends each level


def test_a_prediction_stores_overviews_that_the_cog_copies(tmp_path: Path) -> None:
    path = write_rgb(tmp_path / "in.tif", 700, 1100)
    kwargs = {"tile": 128, "overlap": 32, "batch_size": 4, "progress": False}
    with RasterSource(path) as src:
        out = predict_raster(Identity(), src, NORM, tmp_path / "out.tif", **kwargs)
    assert cog_validate(str(out))[0]
    with rasterio.open(out) as ds:
        heights = ds.read(1)
        assert ds.overviews(1) == overview_factors(1100, 700) == [2, 4]
    expected = levels_of(gdal_cog(heights, tmp_path / "g.tif"))
    for ours, theirs in zip(levels_of(out), expected, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert not list(tmp_path.glob(".out.tif.partial*"))  # overview rows are removed with the partial output


def test_a_resumed_prediction_with_overviews_is_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_rgb(tmp_path / "in.tif", 1100, 600)
    kwargs = {"tile": 128, "overlap": 30, "batch_size": 8, "progress": False}  # stride 98: odd overview rows carry
    calls = [0]

    def failing(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        calls[0] += 1
        if calls[0] == 7:
            raise RuntimeError("simulated failure")
        return Identity()(batch)

    monkeypatch.setattr(predict, "COMMIT_BYTES", 1)  # a commit per tile row, as on a large raster
    with RasterSource(path) as src:
        predict_raster(Identity(), src, NORM, tmp_path / "ref.tif", **kwargs)
        with pytest.raises(RuntimeError, match="simulated"):
            predict_raster(failing, src, NORM, tmp_path / "out.tif", **kwargs)
        assert len(overview_ranges(tmp_path / ".out.tif.partial.tif")) >= 2
        predict_raster(Identity(), src, NORM, tmp_path / "out.tif", **kwargs)
    assert (tmp_path / "out.tif").read_bytes() == (tmp_path / "ref.tif").read_bytes()
    with rasterio.open(tmp_path / "out.tif") as ds:
        assert ds.overviews(1) == [2, 4]


def test_uint16_heights_and_their_std_get_overviews_within_one_code_of_gdal(tmp_path: Path) -> None:
    path = write_rgb(tmp_path / "in.tif", 700, 1100)

    def model(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"height": batch[:, 0] * 10 + 20, "std": batch[:, 1].abs()}

    with RasterSource(path) as src:
        out = predict_raster(
            model, src, NORM, tmp_path / "out.tif", tile=128, overlap=32, out_dtype="uint16",
            uncertainty_path=tmp_path / "out_std.tif", progress=False,
        )  # fmt: skip
    for written in (out, tmp_path / "out_std.tif"):
        assert cog_validate(str(written))[0]
        with rasterio.open(written) as ds:
            codes, factors = ds.read(1), ds.overviews(1)
            ours = [ds.read(1, out_shape=(-(-700 // f), -(-1100 // f))) for f in factors]
        assert factors == [2, 4]
        plain = tmp_path / "plain.tif"
        with rasterio.open(
            plain, "w", driver="GTiff", width=1100, height=700, count=1, dtype="uint16", nodata=65535
        ) as d:
            d.write(codes, 1)
        rasterio.shutil.copy(plain, tmp_path / "g.tif", driver="COG", blocksize=512, overview_resampling="AVERAGE")
        for mine, theirs in zip(ours, levels_of(tmp_path / "g.tif"), strict=True):
            np.testing.assert_array_equal(mine == 65535, theirs == 65535)
            assert np.abs(mine.astype(np.int32) - theirs).max() <= 1


def test_a_size_that_does_not_halve_exactly_gets_gdal_overviews(tmp_path: Path) -> None:
    assert precomputed_levels(1030, 602) == 0 and precomputed_levels(1032, 600) == 2
    path = write_rgb(tmp_path / "in.tif", 602, 1030)
    with RasterSource(path) as src:
        out = predict_raster(Identity(), src, NORM, tmp_path / "out.tif", tile=128, overlap=32, progress=False)
    with rasterio.open(out) as ds:
        heights = ds.read(1)
    expected = levels_of(gdal_cog(heights, tmp_path / "g.tif"))
    for ours, theirs in zip(levels_of(out), expected, strict=True):
        np.testing.assert_array_equal(ours, theirs)
