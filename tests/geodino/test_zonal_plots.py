"""Zonal statistics for plots as crews record them: on the tool's own scaled uint16 output across nodata, point plots
with --buffer in a local metric CRS, CSV plots with x/y columns and --crs, the added statistics and --prefix."""

from __future__ import annotations

import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from shapely.geometry import Point, box

from core.cli import main
from geodino.synthetic import make_forest
from geodino.zonal import zonal_stats

X0, Y0 = 500000.0, 4000000.0


@pytest.fixture(scope="module")
def heights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float32 height raster: 10 m on the left half, 2 m on the right, a nodata square top-left."""
    values = np.full((100, 100), 2.0, np.float32)
    values[:, :50] = 10.0
    values[:20, :20] = np.nan
    path = tmp_path_factory.mktemp("zonal") / "heights.tif"
    profile = {
        "driver": "GTiff",
        "width": 100,
        "height": 100,
        "count": 1,
        "dtype": "float32",
        "nodata": np.nan,
        "crs": "EPSG:32617",
        "transform": rasterio.Affine(1, 0, X0, 0, -1, Y0),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(values, 1)
    return path


def zonal(raster: Path, plots: Path, out: Path, *extra: str) -> int:
    return main(["canopy", "zonal", str(raster), str(plots), str(out), *extra])


def test_zonal_on_the_tools_own_uint16_output_gives_metres_and_the_true_nodata_fraction(
    uint8_model: Path, tmp_path: Path
) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    rgb, _ = make_forest(tmp_path / "forest", size=128, seed=21)
    base = ["canopy", "predict", "--model", str(uint8_model), str(rgb), "--tile", "64", "--overlap", "16"]
    assert main([*base, "--out", str(tmp_path / "f32.tif")]) == 0
    assert main([*base, "--out", str(tmp_path / "u16.tif"), "--dtype", "uint16"]) == 0
    torch.set_num_threads(before)
    with rasterio.open(tmp_path / "f32.tif") as ds:
        metres, transform = ds.read(1), ds.transform
    rows, cols = np.nonzero(np.isnan(metres))
    assert rows.size > 200, "the synthetic scene has a nodata corner"
    r0, c0 = int(np.median(rows)), int(np.median(cols))  # a 40 x 40 px plot around the nodata edge
    r0, c0 = min(max(r0 - 20, 0), 88), min(max(c0 - 20, 0), 88)
    window = metres[r0 : r0 + 40, c0 : c0 + 40]
    left, top = transform * (c0, r0)
    plot = gpd.GeoDataFrame({"plot": ["edge"]}, geometry=[box(left, top - 20, left + 20, top)], crs="EPSG:32617")
    plot.to_file(tmp_path / "plot.gpkg")
    assert zonal(tmp_path / "u16.tif", tmp_path / "plot.gpkg", tmp_path / "stats.gpkg") == 0
    row = gpd.read_file(tmp_path / "stats.gpkg").iloc[0]
    nodata = float(np.isnan(window).mean())
    assert 0.1 < nodata < 0.9, "the plot lies partly over nodata"
    assert row["nodata_fraction"] == pytest.approx(nodata, abs=1e-6)
    assert row["mean"] == pytest.approx(float(np.nanmean(window)), abs=0.006)  # centimetres, back in metres
    assert row["max"] == pytest.approx(float(np.nanmax(window)), abs=0.006) and row["max"] < 120
    assert row["n_pixels"] == pytest.approx(np.isfinite(window).sum())
    assert row["area_m2"] == pytest.approx(400, rel=1e-3)
    assert row["valid_area_m2"] == pytest.approx(400 * (1 - nodata), rel=1e-3)


def test_added_statistics_and_a_prefix_that_keeps_the_users_columns(heights: Path, tmp_path: Path) -> None:
    plots = gpd.GeoDataFrame(
        {"plot": ["a", "b"], "mean": [99.0, 98.0]},  # the crew's own "mean" column
        geometry=[box(X0 + 40, Y0 - 60, X0 + 60, Y0 - 40), box(X0, Y0 - 40, X0 + 40, Y0)],
        crs="EPSG:32617",
    )
    with pytest.raises(Exception, match="--prefix"):
        zonal_stats(heights, plots)
    stats = zonal_stats(heights, plots, prefix="chm_")
    assert list(stats["mean"]) == [99.0, 98.0], "the user's column is untouched"
    a, b = stats.iloc[0], stats.iloc[1]
    assert (a["chm_mean"], a["chm_max"], a["chm_sd"]) == pytest.approx((6.0, 10.0, 4.0), abs=1e-6)
    assert a["chm_area_m2"] == pytest.approx(400, rel=1e-3) and a["chm_valid_area_m2"] == pytest.approx(400, rel=1e-3)
    assert b["chm_nodata_fraction"] == pytest.approx(0.25) and b["chm_valid_area_m2"] == pytest.approx(1200, rel=1e-3)
    assert b["chm_mean"] == pytest.approx(10.0) and b["chm_sd"] == pytest.approx(0.0, abs=1e-6)


def test_point_plots_are_buffered_in_metres_whatever_their_crs(
    heights: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    centres = gpd.GeoDataFrame(
        {"plot": ["left", "right"]}, geometry=[Point(X0 + 25, Y0 - 60), Point(X0 + 75, Y0 - 60)], crs="EPSG:32617"
    )
    centres.to_file(tmp_path / "utm.gpkg")
    centres.to_crs("EPSG:4326").to_file(tmp_path / "wgs84.gpkg")  # degrees: a naive buffer of 10 would be 1,000 km
    assert zonal(heights, tmp_path / "utm.gpkg", tmp_path / "none.gpkg") == 2
    assert "are points" in capsys.readouterr().err and not (tmp_path / "none.gpkg").exists()
    for name in ("utm", "wgs84"):
        assert zonal(heights, tmp_path / f"{name}.gpkg", tmp_path / f"{name}_stats.gpkg", "--buffer", "10") == 0
        stats = gpd.read_file(tmp_path / f"{name}_stats.gpkg")
        assert list(stats.geom_type) == ["Point", "Point"], "the plots keep their own geometry"
        assert stats["area_m2"].tolist() == pytest.approx([math.pi * 100] * 2, rel=2e-3)
        assert stats["mean"].tolist() == pytest.approx([10.0, 2.0]) and stats["nodata_fraction"].max() < 0.01
        assert stats["n_pixels"].tolist() == pytest.approx([math.pi * 100] * 2, rel=0.01)


def test_csv_plots_with_coordinates_and_a_crs(heights: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lonlat = gpd.GeoSeries([Point(X0 + 25, Y0 - 60), Point(X0 + 75, Y0 - 60)], crs="EPSG:32617").to_crs("EPSG:4326")
    table = pd.DataFrame({"plot": ["left", "right"], "Longitude": lonlat.x, "Latitude": lonlat.y, "mean": [1, 2]})
    table.to_csv(tmp_path / "plots.csv", index=False)
    assert zonal(heights, tmp_path / "plots.csv", tmp_path / "s.csv", "--buffer", "10") == 2
    err = capsys.readouterr().err
    assert "a CSV has no CRS" in err and "--crs EPSG:4326" in err and "Traceback" not in err
    args = ["--buffer", "10", "--crs", "EPSG:4326"]
    assert zonal(heights, tmp_path / "plots.csv", tmp_path / "s.csv", *args) == 2
    assert "['mean']" in capsys.readouterr().err, "the crew's mean column is never overwritten"
    assert zonal(heights, tmp_path / "plots.csv", tmp_path / "s.csv", *args, "--prefix", "chm_") == 0
    out = pd.read_csv(tmp_path / "s.csv")
    assert list(out["plot"]) == ["left", "right"] and list(out["mean"]) == [1, 2]
    assert out["chm_mean"].tolist() == pytest.approx([10.0, 2.0]) and out["geometry"].str.startswith("POINT").all()

    utm = pd.DataFrame({"id": [7], "easting": [X0 + 75], "northing": [Y0 - 60]})
    utm.to_csv(tmp_path / "utm.csv", index=False)
    assert zonal(heights, tmp_path / "utm.csv", tmp_path / "u.gpkg", "--buffer", "5", "--crs", "EPSG:32617") == 0
    assert gpd.read_file(tmp_path / "u.gpkg")["mean"].tolist() == pytest.approx([2.0])
    pd.DataFrame({"id": [1], "a": [1.0], "b": [2.0]}).to_csv(tmp_path / "nocoords.csv", index=False)
    assert zonal(heights, tmp_path / "nocoords.csv", tmp_path / "n.gpkg", *args) == 2
    assert "no x coordinate column" in capsys.readouterr().err
