"""The prediction pipeline's stages: batches cut from one window per batch, separable weight sums, the partial output
as row-range files, and results that do not depend on threads, buffer reuse or pinned memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window

import geodino.tile_batches as tile_batches
from core.errors import DinoscopeError
from geodino.cog import create_partial, write_cog, write_rows
from geodino.mosaic import MosaicSource, RegionSource, group_rasters
from geodino.normalise import BandNormaliser
from geodino.partial import ranges, rows_stored
from geodino.predict import predict_raster
from geodino.raster import RasterSource
from geodino.tile_batches import TileBatchReader
from geodino.tiling import TileGrid

NORM = BandNormaliser([127.5] * 3, [60.0] * 3)


def write_rgb(path: Path, height: int, width: int, *, seed: int = 0, left: float = 500000) -> Path:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 250, (3, height, width)).astype(np.uint8)
    data[:, 5:19, 7:40] = 255  # nodata in every band
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 3, "dtype": "uint8"}
    profile.update(crs="EPSG:32617", transform=from_origin(left, 4e6, 0.5, 0.5), nodata=255)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def batches(source: object, normaliser: object, grid: TileGrid, workers: int = 2) -> list:
    reader = TileBatchReader(source, normaliser, grid, 0, 3, workers)
    try:
        return [batch for row in range(len(grid.rows)) for batch in reader.row(row)]
    finally:
        reader.close()


@pytest.mark.parametrize("normaliser", [NORM, lambda data, valid: NORM(data, valid)], ids=["direct", "generic"])
def test_batch_tiles_equal_tiles_read_and_normalised_one_by_one(tmp_path: Path, normaliser: object) -> None:
    path = write_rgb(tmp_path / "in.tif", 150, 203)
    grid = TileGrid(150, 203, 64, 16)
    with RasterSource(path) as src:
        got = batches(src, normaliser, grid)
        assert [(b.y, b.cols) for b in got] == [
            (y, grid.cols[i : i + 3]) for y in grid.rows for i in range(0, len(grid.cols), 3)
        ]
        for batch in got:
            for k, x in enumerate(batch.cols):
                data, valid = src.read(Window(x, batch.y, 64, 64))
                np.testing.assert_array_equal(batch.tiles[k].numpy(), NORM(data, valid))
                np.testing.assert_array_equal(batch.valid[:, x - batch.x0 : x - batch.x0 + 64], valid)


def test_batches_of_a_mosaic_part_read_the_neighbours_exactly_as_single_tiles(tmp_path: Path) -> None:
    tiles = [write_rgb(tmp_path / f"t{k}.tif", 90, 70, seed=k, left=500000 + 35 * k) for k in range(3)]
    [group] = group_rasters(tiles)
    with MosaicSource(group, None) as mosaic:
        part = RegionSource(mosaic, 1, margin=64)
        grid = TileGrid(part.height, part.width, 48, 12, origin=part.origin, extent=part.extent)
        for batch in batches(part, NORM, grid, workers=1):
            for k, x in enumerate(batch.cols):
                data, valid = part.read(Window(x, batch.y, 48, 48))
                np.testing.assert_array_equal(batch.tiles[k].numpy(), NORM(data, valid))


def test_weight_sums_are_the_sums_of_the_tile_weights_and_a_part_shares_the_whole_mosaics() -> None:
    for grid in (TileGrid(150, 203, 64, 16), TileGrid(150, 203, 64, 16, margin=2)):
        total = np.zeros((150, 203))
        for y in grid.rows:
            for x in grid.cols:
                total[y : y + 64, x : x + 64] += grid.weights(y, x)
        rows, cols = grid.weight_sums()
        np.testing.assert_allclose(np.outer(rows, cols), total, rtol=1e-6)
    whole = TileGrid(150, 203, 64, 16)
    part = TileGrid(70, 90, 64, 16, origin=(40, 60), extent=(150, 203))
    (whole_rows, whole_cols), (rows, cols) = whole.weight_sums(), part.weight_sums()
    np.testing.assert_array_equal(rows, whole_rows[40:110])
    np.testing.assert_array_equal(cols, whole_cols[60:150])


class Identity:
    """Returns the first input band itself: its output shares the batch's memory."""

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"height": batch[:, 0]}


def test_output_is_the_same_with_any_number_of_threads_and_a_model_returning_its_input(tmp_path: Path) -> None:
    path = write_rgb(tmp_path / "in.tif", 230, 190)
    kwargs = {"tile": 64, "overlap": 16, "batch_size": 2, "progress": False}
    with RasterSource(path) as src:
        for workers in (1, 3):
            predict_raster(Identity(), src, NORM, tmp_path / f"w{workers}.tif", num_workers=workers, **kwargs)
        data, valid = src.read(Window(0, 0, 190, 230))
    assert (tmp_path / "w1.tif").read_bytes() == (tmp_path / "w3.tif").read_bytes()
    with rasterio.open(tmp_path / "w3.tif") as out:
        heights = out.read(1)
    # Every tile predicts the pixel's own normalised value, so blending must give it back: a batch buffer refilled
    # while its output was still being blended would not.
    expected = NORM(data, valid)[0]
    np.testing.assert_allclose(heights[valid], expected[valid], rtol=1e-5, atol=1e-5)
    assert np.isnan(heights[~valid]).all()


def test_pinned_batches_are_requested_and_never_recycled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_rgb(tmp_path / "in.tif", 100, 100)
    asked: list[bool] = []
    empty = torch.empty

    def cpu_empty(*args: object, pin_memory: bool = False, **kwargs: object) -> torch.Tensor:
        asked.append(pin_memory)  # this machine may have no CUDA to pin with
        return empty(*args, **kwargs)

    monkeypatch.setattr(tile_batches.torch, "empty", cpu_empty)
    with RasterSource(path) as src:
        predict_raster(Identity(), src, NORM, tmp_path / "out.tif", tile=64, overlap=16, pin_memory=True)
    assert asked and all(asked)


def test_the_partial_output_is_one_file_per_range_and_a_missing_range_is_refused(tmp_path: Path) -> None:
    path = write_rgb(tmp_path / "in.tif", 100, 80)
    partial = tmp_path / ".out.tif.partial.tif"
    with RasterSource(path) as src:
        create_partial(partial, src, "float32")
    rows = np.arange(100 * 80, dtype=np.float32).reshape(100, 80)
    for first, stop in ((0, 48), (48, 96), (96, 100)):
        write_rows(partial, first, rows[first:stop])
    assert [(a, b) for a, b, _ in ranges(partial)] == [(0, 48), (48, 96), (96, 100)]
    assert rows_stored(partial) == 100
    out = write_cog(partial, tmp_path / "out.tif", out_dtype="float32", uint16_scale=100, tags={"source": "x"})
    with rasterio.open(out) as ds:
        np.testing.assert_array_equal(ds.read(1), rows)
        assert ds.tags()["source"] == "x" and ds.units == ("m",) and ds.descriptions == ("canopy_height",)
    ranges(partial)[1][2].unlink()
    assert rows_stored(partial) == 48
    with pytest.raises(DinoscopeError, match="covers only 48 of 100 rows"):
        write_cog(partial, tmp_path / "again.tif", out_dtype="float32", uint16_scale=100, tags={})


def test_a_resume_whose_rows_are_no_longer_on_disk_starts_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_rgb(tmp_path / "in.tif", 180, 150)
    kwargs = {"tile": 64, "overlap": 16, "batch_size": 2, "progress": False}
    calls = [0]

    def failing(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        calls[0] += 1
        if calls[0] == 7:  # three tile rows of two batches are on disk, the fourth is never finished
            raise RuntimeError("simulated failure")
        return Identity()(batch)

    with RasterSource(path) as src:
        predict_raster(Identity(), src, NORM, tmp_path / "ref.tif", **kwargs)
        with pytest.raises(RuntimeError, match="simulated"):
            predict_raster(failing, src, NORM, tmp_path / "out.tif", **kwargs)
        stored = ranges(tmp_path / ".out.tif.partial.tif")
        assert stored and stored[-1][1] > 0  # the finished tile rows were committed when the failure stopped the run
        stored[0][2].unlink()
        with caplog.at_level("WARNING"):
            predict_raster(Identity(), src, NORM, tmp_path / "out.tif", **kwargs)
    assert "no longer on disk" in caplog.text
    assert (tmp_path / "out.tif").read_bytes() == (tmp_path / "ref.tif").read_bytes()
