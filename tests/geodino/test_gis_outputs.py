"""Outputs GIS tools read well: COG and VRT bands carry the unit (metres), scale and offset; the PNG preview shows
the input RGB beside the height map with a colour bar and a scale bar."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import rasterio
import torch
from rasterio.crs import CRS

from core.plots import new_figure
from geodino.cog import validate_cog
from geodino.mosaic_predict import predict_many
from geodino.normalise import BandNormaliser
from geodino.plots import _scale_bar, raster_preview
from geodino.predict import predict_raster
from geodino.raster import RasterSource
from geodino.synthetic import make_forest

NORM = BandNormaliser([127.5] * 3, [60.0] * 3)


def greenness(batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """A local stand-in model: height from how much greener than red and blue a pixel is, plus a std."""
    height = torch.relu(batch[:, 1] - 0.5 * (batch[:, 0] + batch[:, 2])) * 10 + 1
    return {"height": height, "std": height * 0.1}


@pytest.mark.parametrize(("dtype", "scale"), [("float32", 1.0), ("uint16", 0.01)])
def test_cog_and_vrt_bands_carry_unit_scale_and_offset(tmp_path: Path, dtype: str, scale: float) -> None:
    rgb, _ = make_forest(tmp_path / "forest", size=96, seed=30)
    with RasterSource(rgb) as src:
        predict_raster(
            greenness,
            src,
            NORM,
            tmp_path / "chm.tif",
            tile=64,
            overlap=16,
            out_dtype=dtype,
            uncertainty_path=tmp_path / "chm_std.tif",
            progress=False,
        )
    for name in ("chm.tif", "chm_std.tif"):
        assert validate_cog(tmp_path / name)[0]
        with rasterio.open(tmp_path / name) as ds:
            assert ds.units == ("m",) and ds.scales == (pytest.approx(scale),) and ds.offsets == (0.0,)
            assert ds.tags()["units"] == "m" and ds.descriptions[0] in ("canopy_height", "canopy_height_std")
    predict_many(
        greenness,
        [rgb],
        tmp_path / "dir",
        normaliser=NORM,
        tile=64,
        overlap=16,
        out_dtype=dtype,
        rank=0,
        world_size=1,
        progress=False,
    )
    with rasterio.open(tmp_path / "dir" / "mosaic.vrt") as vrt:
        assert vrt.units == ("m",) and vrt.scales == (pytest.approx(scale),) and vrt.offsets == (0.0,)


def test_preview_shows_the_rgb_beside_the_heights_with_colour_and_scale_bars(tmp_path: Path) -> None:
    rgb, _ = make_forest(tmp_path / "forest", size=96, seed=31)
    with RasterSource(rgb) as src:
        predict_raster(greenness, src, NORM, tmp_path / "chm.tif", tile=64, overlap=16, progress=False)
    alone = matplotlib.image.imread(raster_preview(tmp_path / "chm.tif", tmp_path / "alone.png"))
    both = matplotlib.image.imread(raster_preview(tmp_path / "chm.tif", tmp_path / "both.png", rgb=rgb))
    assert both.shape[1] > 1.6 * alone.shape[1], "two panels side by side"
    left = both[:, : both.shape[1] // 3, :3]
    assert left.std() > 0.1 and not np.allclose(left[..., 0], left[..., 1]), "the left panel is a colour image"

    fig = new_figure()
    ax = fig.subplots()
    _scale_bar(ax, CRS.from_epsg(32617), (500000.0, 500048.0, 4e6 - 48, 4e6))  # 48 m wide: a 10 m bar
    _scale_bar(ax, CRS.from_epsg(4326), (10.0, 10.05, 0.0, 0.05))  # 0.05 deg at the equator: 5.6 km wide
    _scale_bar(ax, CRS.from_epsg(2263), (0.0, 4000.0, 0.0, 2000.0))  # 4,000 US survey feet: 1.2 km
    labels = [bar.txt_label.get_text() for bar in ax.artists]
    assert labels == ["10 m", "1 km", "200 m"]
    assert ax.artists[1].size_bar.get_children()[0].get_width() == pytest.approx(1000 / 111320, rel=1e-3)
