"""Tiled prediction: seamless blending, COG output on the input grid, nodata, uint16, resume, ranks and VRT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window

from core.errors import DinoscopeError
from geodino.cog import validate_cog
from geodino.mosaic_predict import predict_many
from geodino.normalise import BandNormaliser
from geodino.predict import predict_raster
from geodino.raster import RasterSource
from geodino.tiling import TileGrid, ramp_1d

REAL = Path(__file__).parents[1] / "data" / "real"
NORM = BandNormaliser([127.5] * 3, [60.0] * 3)


def write_rgb(
    path: Path,
    height: int,
    width: int,
    *,
    seed: int = 0,
    origin: tuple[float, float] = (500000, 4e6),
    nodata_box: tuple[slice, slice] | None = (slice(0, 17), slice(0, 29)),
) -> Path:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 250, (3, height, width)).astype(np.uint8)
    if nodata_box is not None:
        data[:, nodata_box[0], nodata_box[1]] = 255
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32617",
        "transform": from_origin(*origin, 0.5, 0.5),
        "nodata": 255,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


class LocalConv:
    """A fixed 3x3 convolution: a local model whose tiled output must match its whole-raster output."""

    def __init__(self, with_std: bool = False) -> None:
        gen = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 0.3)
            self.conv.bias.fill_(0.0)
        self.with_std = with_std
        self.batches = 0

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        self.batches += 1
        out = self.conv(batch)
        result = {"height": out[:, 0] * 5 + 15}
        if self.with_std:
            result["std"] = out[:, 1].abs() + 0.5
        return result


def whole_prediction(model: LocalConv, path: Path) -> tuple[np.ndarray, np.ndarray]:
    with RasterSource(path) as src:
        data, valid = src.read(Window(0, 0, src.width, src.height))
    with torch.no_grad():
        out = model(torch.from_numpy(NORM(data, valid))[None])
    return out["height"][0].numpy(), valid


def test_ramp_weights_are_smooth_positive_and_blend_to_positive_everywhere() -> None:
    ramp = ramp_1d(64, 16)
    assert ramp.min() > 0 and ramp.max() == 1.0
    assert np.all(np.diff(ramp[:16]) > 0) and np.all(ramp[16:48] == 1)
    np.testing.assert_array_equal(ramp, ramp[::-1])
    # Hann ramps of neighbouring tiles sum to exactly 1 where the stride is regular (partition of unity).
    regular = TileGrid(height=160, width=160, tile=64, overlap=16)
    total = np.zeros((160, 160))
    for y in regular.rows:
        for x in regular.cols:
            total[y : y + 64, x : x + 64] += regular.weights(y, x)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    # Irregular last tiles and a zero-weight margin still leave every pixel with positive weight.
    grid = TileGrid(height=150, width=203, tile=64, overlap=16, margin=2)
    assert grid.rows[-1] == 150 - 64 and grid.cols[-1] == 203 - 64
    total = np.zeros((150, 203))
    for y in grid.rows:
        for x in grid.cols:
            total[y : y + 64, x : x + 64] += grid.weights(y, x)
    assert total.min() > 0.05


def test_tiled_prediction_equals_whole_raster_for_a_local_model(tmp_path: Path) -> None:
    path = write_rgb(tmp_path / "in.tif", 301, 389)
    model = LocalConv()
    with RasterSource(path) as src:
        predict_raster(
            model, src, NORM, tmp_path / "tiled.tif", tile=96, overlap=24, margin=1, batch_size=3, progress=False
        )
    expected, valid = whole_prediction(model, path)
    with rasterio.open(tmp_path / "tiled.tif") as out:
        tiled = out.read(1)
    assert np.array_equal(np.isfinite(tiled), valid)
    np.testing.assert_allclose(tiled[valid], expected[valid], atol=1e-4)

    # The same comparison catches seams: tiles that are not blended differ along tile borders.
    with RasterSource(path) as src:
        predict_raster(model, src, NORM, tmp_path / "seams.tif", tile=96, overlap=0, progress=False)
    with rasterio.open(tmp_path / "seams.tif") as out:
        seams = out.read(1)
    assert np.nanmax(np.abs(seams - expected)[valid]) > 0.05


def test_output_is_a_valid_cog_on_the_input_grid_with_nodata_and_tags(tmp_path: Path) -> None:
    path = write_rgb(tmp_path / "in.tif", 700, 650)
    with RasterSource(path) as src:
        predict_raster(
            LocalConv(),
            src,
            NORM,
            tmp_path / "chm.tif",
            tile=128,
            overlap=32,
            batch_size=4,
            num_workers=2,
            progress=False,
        )
    ok, errors, _ = validate_cog(tmp_path / "chm.tif")
    assert ok, errors
    with rasterio.open(path) as src, rasterio.open(tmp_path / "chm.tif") as out:
        assert (out.crs, out.transform, out.width, out.height) == (src.crs, src.transform, src.width, src.height)
        assert out.dtypes[0] == "float32" and np.isnan(out.nodata)
        assert out.overviews(1), "COG must carry overviews"
        assert out.tags()["units"] == "m"
        heights = out.read(1)
        invalid_in = src.dataset_mask() == 0
    assert np.array_equal(np.isnan(heights), invalid_in)
    assert not (tmp_path / ".chm.tif.partial.tif").exists() and not (tmp_path / ".chm.tif.partial.json").exists()


def test_uint16_output_is_scaled_documented_and_std_is_written(tmp_path: Path) -> None:
    path = write_rgb(tmp_path / "in.tif", 200, 230)
    model = LocalConv(with_std=True)
    with RasterSource(path) as src:
        predict_raster(model, src, NORM, tmp_path / "f.tif", tile=64, overlap=16, progress=False)
        predict_raster(
            model,
            src,
            NORM,
            tmp_path / "u.tif",
            tile=64,
            overlap=16,
            out_dtype="uint16",
            uint16_scale=100,
            uncertainty_path=tmp_path / "u_std.tif",
            progress=False,
        )
    with rasterio.open(tmp_path / "f.tif") as f, rasterio.open(tmp_path / "u.tif") as u:
        metres = f.read(1)
        assert u.dtypes[0] == "uint16" and u.nodata == 65535 and u.scales[0] == pytest.approx(0.01)
        assert "100" in u.tags()["encoding"]
        stored = u.read(1)
    valid = np.isfinite(metres)
    assert np.array_equal(stored == 65535, ~valid)
    np.testing.assert_allclose(stored[valid] / 100, np.clip(metres[valid], 0, None), atol=0.0051)
    assert validate_cog(tmp_path / "u_std.tif")[0]
    with rasterio.open(tmp_path / "u_std.tif") as s:
        std = s.read(1)
    assert std[valid].min() >= 50  # std >= 0.5 m by construction


def test_interrupted_run_resumes_without_redoing_strips_and_gives_the_identical_file(tmp_path: Path) -> None:
    path = write_rgb(tmp_path / "in.tif", 330, 250)
    kwargs = {"tile": 64, "overlap": 16, "batch_size": 2, "progress": False}
    with RasterSource(path) as src:
        predict_raster(LocalConv(), src, NORM, tmp_path / "ref.tif", **kwargs)
        grid = TileGrid(330, 250, 64, 16)
        batches_per_row = -(-len(grid.cols) // 2)

        class CrashError(RuntimeError):
            pass

        model = LocalConv()
        stop_after = 2 * batches_per_row + 1  # two finished strips, then a failure in the middle of the third

        def failing(batch: torch.Tensor) -> dict[str, torch.Tensor]:
            if model.batches == stop_after:
                raise CrashError("simulated failure")
            return model(batch)

        with pytest.raises(CrashError):
            predict_raster(failing, src, NORM, tmp_path / "out.tif", **kwargs)
        assert not (tmp_path / "out.tif").exists(), "no half-written file under the final name"
        progress = json.loads((tmp_path / ".out.tif.partial.json").read_text())
        assert progress["next_row"] == 2

        resumed = LocalConv()
        predict_raster(resumed, src, NORM, tmp_path / "out.tif", **kwargs)
    assert resumed.batches == (len(grid.rows) - 2) * batches_per_row
    assert (tmp_path / "out.tif").read_bytes() == (tmp_path / "ref.tif").read_bytes()


def test_predict_many_splits_inputs_across_ranks_and_mosaics_them_in_a_vrt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = [
        write_rgb(tmp_path / f"tile{i}.tif", 80, 100, seed=i, origin=(500000 + 50 * i, 4e6), nodata_box=None)
        for i in range(3)
    ]
    out_dir = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    done = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        done[rank] = predict_many(LocalConv(), inputs, out_dir, normaliser=NORM, tile=64, overlap=16, progress=False)
        if rank == 0:
            assert not (out_dir / "mosaic.vrt").exists(), "rank 1 has not finished yet"
    assert [p.name for p in done[0]] == ["tile0.tif", "tile2.tif"] and [p.name for p in done[1]] == ["tile1.tif"]
    with rasterio.open(out_dir / "mosaic.vrt") as vrt:
        assert (vrt.width, vrt.height) == (300, 80) and vrt.crs.to_epsg() == 32617
        mosaic = vrt.read(1)
    for i in range(3):
        with rasterio.open(out_dir / f"tile{i}.tif") as one:
            np.testing.assert_array_equal(mosaic[:, 100 * i : 100 * (i + 1)], one.read(1))


def test_predict_many_with_uncertainty_mosaics_heights_and_std(tmp_path: Path) -> None:
    inputs = [
        write_rgb(tmp_path / f"tile{i}.tif", 64, 70, seed=i, origin=(500000 + 35 * i, 4e6), nodata_box=None)
        for i in range(2)
    ]
    out_dir = tmp_path / "out"
    done = predict_many(
        LocalConv(with_std=True),
        inputs,
        out_dir,
        normaliser=NORM,
        uncertainty=True,
        tile=64,
        overlap=16,
        rank=0,
        world_size=1,
        progress=False,
    )
    assert [p.name for p in done] == ["tile0.tif", "tile1.tif"]
    with rasterio.open(out_dir / "mosaic_std.vrt") as vrt, rasterio.open(out_dir / "tile1_std.tif") as one:
        assert vrt.width == 140
        np.testing.assert_array_equal(vrt.read(1)[:, 70:], one.read(1))
        assert one.read(1).min() >= 0.5


def test_model_output_of_the_wrong_size_is_a_clear_error(tmp_path: Path) -> None:
    path = write_rgb(tmp_path / "in.tif", 70, 70)

    def quarter_resolution(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"height": batch[:, 0, ::4, ::4]}

    with RasterSource(path) as src, pytest.raises(DinoscopeError, match="shape"):
        predict_raster(quarter_resolution, src, NORM, tmp_path / "x.tif", tile=64, overlap=16, progress=False)
    assert not (tmp_path / "x.tif").exists()


def test_real_striped_orthophoto_keeps_grid_and_nodata(tmp_path: Path) -> None:
    def greenness(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"height": torch.relu(batch[:, 1] - 0.5 * (batch[:, 0] + batch[:, 2])) * 10}

    with RasterSource(REAL / "OSBS_029.tif") as src:
        predict_raster(greenness, src, NORM, tmp_path / "osbs.tif", tile=128, overlap=32, progress=False)
    with rasterio.open(REAL / "OSBS_029.tif") as src, rasterio.open(tmp_path / "osbs.tif") as out:
        assert out.crs == src.crs and out.transform == src.transform and out.shape == src.shape
        invalid = src.dataset_mask() == 0  # GDAL's mask: nodata only where all three bands are 255
        assert np.array_equal(np.isnan(out.read(1)), invalid)
    assert validate_cog(tmp_path / "osbs.tif")[0]
