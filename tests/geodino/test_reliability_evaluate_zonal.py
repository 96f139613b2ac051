"""`canopy evaluate` and `canopy zonal` refuse what cannot give a meaningful answer, each with one message saying
why and what to do: an RGB image as the reference CHM, no pixel to compare, polygons without a CRS or off the
raster, outputs that cannot be written. Polygons partly off the raster keep their rows with empty statistics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from shapely.geometry import box, mapping

from core.cli import main

X0, Y0 = 500000.0, 4000000.0


def write(path: Path, values: np.ndarray, *, origin: tuple[float, float] = (X0, Y0), nodata: float = np.nan) -> Path:
    values = values if values.ndim == 3 else values[None]
    profile = {
        "driver": "GTiff",
        "width": values.shape[2],
        "height": values.shape[1],
        "count": values.shape[0],
        "dtype": "float32",
        "crs": "EPSG:32617",
        "transform": from_origin(*origin, 1, 1),
        "nodata": nodata,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(values.astype(np.float32))
    return path


@pytest.fixture
def heights(tmp_path: Path) -> Path:
    yy, xx = np.mgrid[0:60, 0:80]
    return write(tmp_path / "pred.tif", 10 + np.sin(xx / 7.0) * np.cos(yy / 5.0) * 5)


def evaluate(pred: Path, ref: Path, out: Path) -> int:
    return main(["canopy", "evaluate", str(pred), str(ref), "--out", str(out)])


def test_evaluate_refuses_a_three_band_image_as_the_reference_or_the_prediction(
    tmp_path: Path, heights: Path, capsys: pytest.CaptureFixture
) -> None:
    rgb = write(tmp_path / "rgb.tif", np.stack([np.full((60, 80), v) for v in (40.0, 90.0, 30.0)]))
    assert evaluate(heights, rgb, tmp_path / "e") == 2
    err = capsys.readouterr().err
    assert "rgb.tif" in err and "REF has 3 bands; a CHM has one" in err and "fix:" in err and "gdal_translate" in err
    assert evaluate(rgb, heights, tmp_path / "e") == 2
    assert "PRED has 3 bands; a canopy-height prediction has one" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_evaluate_says_why_no_pixel_can_be_compared(
    tmp_path: Path, heights: Path, capsys: pytest.CaptureFixture
) -> None:
    empty = np.full((60, 80), np.nan)
    left, right = np.full((60, 80), 12.0), np.full((60, 80), 12.0)
    left[:, 40:] = np.nan
    right[:, :40] = np.nan
    cases = [
        (heights, write(tmp_path / "far.tif", empty + 1, origin=(X0 + 1e4, Y0)), "far.tif", "does not overlap"),
        (write(tmp_path / "blank.tif", empty), heights, "blank.tif", "PRED has no valid pixel: every pixel is nodata"),
        (heights, write(tmp_path / "void.tif", empty), "void.tif", "REF has no valid pixel inside PRED's extent"),
        (
            write(tmp_path / "l.tif", left),
            write(tmp_path / "r.tif", right),
            "r.tif",
            "2400 valid pixels and REF's 2400",
        ),
    ]
    for pred, ref, name, why in cases:
        assert evaluate(pred, ref, tmp_path / "e") == 2
        err = capsys.readouterr().err
        assert name in err and why in err and "fix:" in err, err
    assert not (tmp_path / "e").exists()


def test_evaluate_output_must_be_a_writable_directory(
    tmp_path: Path, heights: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "file").write_text("x")
    assert evaluate(heights, heights, tmp_path / "file") == 2
    assert "is an existing file, but a directory is needed here" in capsys.readouterr().err
    assert evaluate(heights, heights, tmp_path / "file" / "eval") == 2
    assert "file is a file, not a directory" in capsys.readouterr().err
    assert evaluate(heights, heights, tmp_path / "eval") == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["mae"] == 0.0


def plots(*boxes: tuple[float, float, float, float]) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(
        {"plot": [f"p{i}" for i in range(len(boxes))]}, geometry=[box(*b) for b in boxes], crs="EPSG:32617"
    )


def zonal(raster: Path, polygons: Path, out: Path) -> int:
    return main(["canopy", "zonal", str(raster), str(polygons), str(out)])


def test_zonal_refuses_polygons_without_a_crs_naming_the_file_and_the_fix(
    tmp_path: Path, heights: Path, capsys: pytest.CaptureFixture
) -> None:
    features = [
        {"type": "Feature", "properties": {"plot": "a"}, "geometry": mapping(box(X0 + 5, Y0 - 20, X0 + 25, Y0))}
    ]
    geojson = tmp_path / "plots.geojson"  # UTM metres in a GeoJSON without "crs": GDAL reads it as WGS84 degrees
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    assert zonal(heights, geojson, tmp_path / "o.gpkg") == 2
    err = capsys.readouterr().err
    assert "plots.geojson" in err and "are not degrees" in err and "ogr2ogr -a_srs" in err and "Traceback" not in err

    plots((X0 + 5, Y0 - 20, X0 + 25, Y0)).to_file(tmp_path / "plots.shp")
    (tmp_path / "plots.prj").unlink()  # a shapefile without its .prj has no CRS at all
    assert zonal(heights, tmp_path / "plots.shp", tmp_path / "o.gpkg") == 2
    err = capsys.readouterr().err
    assert "plots.shp" in err and "have no CRS" in err and "assign the CRS" in err
    assert not (tmp_path / "o.gpkg").exists()


def test_zonal_polygons_off_the_raster_some_get_empty_rows_all_is_an_error(
    tmp_path: Path, heights: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    inside, outside = (X0 + 10, Y0 - 30, X0 + 30, Y0 - 10), (X0 + 500, Y0 - 30, X0 + 520, Y0 - 10)
    plots(inside, outside, inside).to_file(tmp_path / "some.gpkg")
    with caplog.at_level(logging.WARNING):
        assert zonal(heights, tmp_path / "some.gpkg", tmp_path / "some_stats.gpkg") == 0
    assert "1 of 3 polygons lie entirely outside pred.tif" in caplog.text
    stats = gpd.read_file(tmp_path / "some_stats.gpkg")
    assert list(stats["plot"]) == ["p0", "p1", "p2"], "every polygon keeps its row, in order"
    assert stats.loc[1, "n_pixels"] == 0 and stats.loc[1, "nodata_fraction"] == 1.0 and np.isnan(stats.loc[1, "mean"])
    assert stats.loc[0, "n_pixels"] == pytest.approx(400) and 5 < stats.loc[0, "mean"] < 15

    plots(outside).to_file(tmp_path / "none.gpkg")
    assert zonal(heights, tmp_path / "none.gpkg", tmp_path / "none_stats.gpkg") == 2
    err = capsys.readouterr().err
    assert "none of the 1 polygons overlaps the raster" in err and "x 500500 to 500520" in err and "fix:" in err
    assert not (tmp_path / "none_stats.gpkg").exists()


def test_zonal_output_that_is_a_directory_or_below_a_file_exits_2(
    tmp_path: Path, heights: Path, capsys: pytest.CaptureFixture
) -> None:
    plots((X0 + 10, Y0 - 30, X0 + 30, Y0 - 10)).to_file(tmp_path / "p.gpkg")
    (tmp_path / "out").mkdir()
    (tmp_path / "file").write_text("x")
    assert zonal(heights, tmp_path / "p.gpkg", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "is an existing directory, but a file is needed here" in err and "out/output.gpkg" in err
    assert zonal(heights, tmp_path / "p.gpkg", tmp_path / "file" / "s.gpkg") == 2
    assert "file is a file, not a directory" in capsys.readouterr().err
    assert not list((tmp_path / "out").iterdir()) and (tmp_path / "file").read_text() == "x"
