"""Many touching tiles predicted as one mosaic: no seams at tile borders, outputs on each input's grid plus
mosaic.vrt, --mosaic for one COG, one mosaic per CRS, resumable jobs whose records name their neighbours."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from core.cli import main
from geodino.cog import validate_cog
from geodino.model import load_canopy_model
from geodino.mosaic import MosaicSource, RegionSource, group_rasters
from geodino.mosaic_predict import predict_many
from geodino.normalise import BandNormaliser
from geodino.predict import predict_raster
from geodino.prediction import predict_files
from geodino.raster import RasterSource
from geodino.synthetic import make_forest
from geodino.tiling import TileGrid

NORM = BandNormaliser([127.5] * 3, [60.0] * 3)


def cut_tiles(image: Path, out: Path, rows: int, cols: int) -> list[Path]:
    """Cut ``image`` into ``rows x cols`` touching GeoTIFF tiles (same grid, no overlap)."""
    out.mkdir(parents=True, exist_ok=True)
    tiles = []
    with rasterio.open(image) as src:
        edges_r = np.linspace(0, src.height, rows + 1).astype(int)
        edges_c = np.linspace(0, src.width, cols + 1).astype(int)
        for i in range(rows):
            for j in range(cols):
                window = Window(edges_c[j], edges_r[i], edges_c[j + 1] - edges_c[j], edges_r[i + 1] - edges_r[i])
                profile = dict(src.profile, width=window.width, height=window.height)
                profile["transform"] = src.window_transform(window)
                tiles.append(out / f"tile_{i}{j}.tif")
                with rasterio.open(tiles[-1], "w", **profile) as dst:
                    dst.write(src.read(window=window))
    return tiles


def border_jump_ratio(heights: np.ndarray, row: int, col: int) -> tuple[float, float, float]:
    """``(ratio, border, elsewhere)``: mean |height change| across the tile borders (between rows ``row - 1`` and
    ``row``, columns ``col - 1`` and ``col``) over the median of the same mean for every other row and column line."""
    across_cols = np.nanmean(np.abs(np.diff(heights, axis=1)), axis=0)  # line k: between columns k and k + 1
    across_rows = np.nanmean(np.abs(np.diff(heights, axis=0)), axis=1)
    border = float(
        np.nanmean(
            np.concatenate([np.abs(heights[:, col] - heights[:, col - 1]), np.abs(heights[row] - heights[row - 1])])
        )
    )
    elsewhere = float(np.nanmedian(np.concatenate([np.delete(across_cols, col - 1), np.delete(across_rows, row - 1)])))
    return border / elsewhere, border, elsewhere


def whole_top(path: Path) -> float:
    with rasterio.open(path) as ds:
        return ds.transform.f


def whole_left(path: Path) -> float:
    with rasterio.open(path) as ds:
        return ds.transform.c


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_four_touching_tiles_predicted_as_a_folder_join_without_seams(
    uint8_model: Path, tmp_path: Path, one_thread: None
) -> None:
    rgb, _ = make_forest(tmp_path / "scene", size=768, seed=2)
    tiles = cut_tiles(rgb, tmp_path / "tiles", 2, 2)
    written = predict_files(
        uint8_model, [tmp_path / "tiles"], tmp_path / "chm", tile=64, overlap=16, batch_size=16, progress=False
    )
    assert written == [tmp_path / "chm" / tile.name for tile in tiles]
    for tile, out in zip(tiles, written, strict=True):  # one COG per input, on that input's grid
        assert validate_cog(out)[0]
        with rasterio.open(tile) as src, rasterio.open(out) as pred:
            assert (pred.crs, pred.transform, pred.shape) == (src.crs, src.transform, src.shape)
    with rasterio.open(tmp_path / "chm" / "mosaic.vrt") as vrt:
        mosaic = vrt.read(1, masked=True).filled(np.nan)

    model = load_canopy_model(uint8_model)
    with RasterSource(rgb) as src:  # the same scene as one raster
        predict_raster(
            model.predict_batch,
            src,
            model.normaliser,
            tmp_path / "whole.tif",
            tile=64,
            overlap=16,
            batch_size=16,
            progress=False,
        )
    with rasterio.open(tmp_path / "whole.tif") as whole:
        np.testing.assert_allclose(mosaic, whole.read(1), atol=1e-4, equal_nan=True)

    separate = np.full(mosaic.shape, np.nan, np.float32)  # the old way: each file on its own
    for tile in tiles:
        with RasterSource(tile) as src:
            out = tmp_path / "alone" / tile.name
            predict_raster(
                model.predict_batch, src, model.normaliser, out, tile=64, overlap=16, batch_size=16, progress=False
            )
        with rasterio.open(out) as pred:
            r = round((whole_top(rgb) - pred.transform.f) / 0.5)
            c = round((pred.transform.c - whole_left(rgb)) / 0.5)
            separate[r : r + pred.height, c : c + pred.width] = pred.read(1)
    ratio, border, elsewhere = border_jump_ratio(mosaic, 384, 384)
    alone_ratio, alone_border, _ = border_jump_ratio(separate, 384, 384)
    print(
        f"border jump: mosaic {border:.3f} m / {elsewhere:.3f} m = {ratio:.3f}; file by file {alone_border:.3f} m "
        f"= {alone_ratio:.3f}"
    )
    assert ratio <= 1.2
    assert alone_ratio > 2.0, "the measure must catch the seams of file-by-file prediction"


class LocalConv:
    """A fixed 3x3 convolution: local, so any exact tiling gives its whole-raster output."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) * 0.3)
            self.conv.bias.fill_(0.5)
        self.calls = 0

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {"height": self.conv(batch)[:, 0] * 5 + 15}


def test_a_part_sees_exactly_the_tiles_and_weights_of_the_whole_mosaic(tmp_path: Path) -> None:
    whole = TileGrid(150, 203, 64, 16)
    part = TileGrid(70, 90, 64, 16, origin=(40, 60), extent=(150, 203))
    assert [r + 40 for r in part.rows] == [r for r in whole.rows if r < 110 and r + 64 > 40]
    assert [c + 60 for c in part.cols] == [c for c in whole.cols if c < 150 and c + 64 > 60]
    for y in part.rows:
        for x in part.cols:
            np.testing.assert_array_equal(part.weights(y, x), whole.weights(y + 40, x + 60))
    assert part.finished_rows(0) == (0, part.rows[1])  # the first tile starts above the part: rows clip at 0

    rgb, _ = make_forest(tmp_path / "scene", size=160, seed=3)
    tiles = cut_tiles(rgb, tmp_path / "tiles", 2, 3)
    [group] = group_rasters(tiles)
    assert (group.height, group.width, len(group.members)) == (160, 160, 6)
    with RasterSource(rgb) as src:
        predict_raster(LocalConv(), src, NORM, tmp_path / "whole.tif", tile=48, overlap=12, progress=False)
    with rasterio.open(tmp_path / "whole.tif") as ds:
        expected = ds.read(1)
    for k, member in enumerate(group.members):
        with MosaicSource(group, None) as mosaic:
            region = RegionSource(mosaic, k, margin=48)
            predict_raster(LocalConv(), region, NORM, tmp_path / f"part{k}.tif", tile=48, overlap=12, progress=False)
        with rasterio.open(tmp_path / f"part{k}.tif") as ds:
            window = (slice(member.row, member.row + member.height), slice(member.col, member.col + member.width))
            np.testing.assert_allclose(ds.read(1), expected[window], atol=1e-5, equal_nan=True)


def test_mosaic_flag_writes_one_cog_and_rasters_in_other_crs_form_their_own_mosaic(
    uint8_model: Path, tmp_path: Path, one_thread: None, capsys: pytest.CaptureFixture
) -> None:
    rgb, _ = make_forest(tmp_path / "a", size=128, seed=4)
    utm18, _ = make_forest(tmp_path / "b", size=96, seed=5, crs="EPSG:32618")
    tiles = cut_tiles(rgb, tmp_path / "tiles", 1, 2) + [utm18]

    def predict(inputs: list[Path], out: Path, *extra: str) -> int:
        args = ["canopy", "predict", "--model", str(uint8_model), *map(str, inputs), "--out", str(out)]
        return main([*args, "--tile", "64", "--overlap", "16", *extra])

    assert predict(tiles, tmp_path / "each") == 0
    names = sorted(p.name for p in (tmp_path / "each").iterdir())
    assert "mosaic_EPSG32617_0p5.vrt" in names and "mosaic_EPSG32618_0p5.vrt" in names and "mosaic.vrt" not in names
    with rasterio.open(tmp_path / "each" / "mosaic_EPSG32617_0p5.vrt") as vrt:
        assert vrt.shape == (128, 128) and vrt.units == ("m",)
        per_input = vrt.read(1)

    assert predict(tiles, tmp_path / "one.tif", "--mosaic") == 2
    assert "2 mosaics" in capsys.readouterr().err and not (tmp_path / "one.tif").exists()
    assert predict(tiles[:2], tmp_path / "one.tif", "--mosaic") == 0
    assert validate_cog(tmp_path / "one.tif")[0] and (tmp_path / "one.png").exists()
    with rasterio.open(tmp_path / "one.tif") as one, rasterio.open(rgb) as src:
        assert (one.transform, one.shape) == (src.transform, src.shape)
        np.testing.assert_allclose(one.read(1), per_input, atol=1e-4, equal_nan=True)
    assert predict(tiles, tmp_path / "both", "--mosaic") == 0
    assert sorted(p.suffix for p in (tmp_path / "both").glob("mosaic_EPSG*.tif")) == [".tif", ".tif"]


def test_an_interrupted_folder_run_resumes_and_a_changed_neighbour_makes_an_output_different(
    tmp_path: Path, uint8_model: Path, one_thread: None, capsys: pytest.CaptureFixture
) -> None:
    rgb, _ = make_forest(tmp_path / "scene", size=128, seed=6)
    tiles = cut_tiles(rgb, tmp_path / "tiles", 2, 1)
    kwargs = {
        "normaliser": NORM,
        "tile": 32,
        "overlap": 8,
        "batch_size": 2,
        "progress": False,
        "rank": 0,
        "world_size": 1,
        "record_base": {"model": {"name": "conv", "bytes": 1, "sha256": "x"}},
    }
    predict_many(LocalConv(), tiles, tmp_path / "ref", **kwargs)
    model = LocalConv()

    def failing(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if model.calls == 6:
            raise RuntimeError("simulated failure")
        return model(batch)

    with pytest.raises(RuntimeError, match="simulated"):
        predict_many(failing, tiles, tmp_path / "out", **kwargs)
    state = json.loads((tmp_path / "out" / ".tile_00.tif.partial.json").read_text())
    assert state["next_row"] > 0 and state["config"]["context"][0]["name"] == "tile_10.tif"
    resumed = LocalConv()
    predict_many(resumed, tiles, tmp_path / "out", **kwargs)
    for tile in tiles:
        assert (tmp_path / "out" / tile.name).read_bytes() == (tmp_path / "ref" / tile.name).read_bytes()

    args = [
        "canopy",
        "predict",
        "--model",
        str(uint8_model),
        str(tmp_path / "tiles"),
        "--out",
        str(tmp_path / "cli"),
        "--tile",
        "64",
        "--overlap",
        "16",
    ]
    assert main(args) == 0
    with rasterio.open(tiles[1], "r+") as dst:  # the lower neighbour changes: the upper tile's border changes too
        dst.write(np.full((3, 10, 10), 40, np.uint8), window=Window(0, 0, 10, 10))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "tile_00.tif" in err and "neighbours" in err and "--overwrite" in err
    assert main([*args, "--overwrite"]) == 0
