"""`dinoscope canopy evaluate` and `zonal`: metric files, figures, polygon statistics and clear CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import matplotlib.image
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.warp import Resampling, calculate_default_transform, reproject
from shapely.geometry import box

from core.cli import main
from geodino.evaluate import evaluate_rasters
from geodino.metrics import BlockR2, CanopyMetrics

ORIGIN = (500000.0, 4000000.0)


def write_float(
    path: Path,
    values: np.ndarray,
    *,
    nodata: float = np.nan,
    crs: str = "EPSG:32617",
    transform: rasterio.Affine | None = None,
) -> Path:
    profile = {
        "driver": "GTiff",
        "width": values.shape[1],
        "height": values.shape[0],
        "count": 1,
        "dtype": "float32",
        "crs": crs,
        "transform": transform or from_origin(*ORIGIN, 1, 1),
        "nodata": nodata,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(values.astype(np.float32), 1)
    return path


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ref = rng.gamma(2, 6, (240, 260)).astype(np.float32)
    pred = (ref + rng.normal(0.5, 2, ref.shape)).astype(np.float32)
    pred[:10, :10] = np.nan
    ref_stored = ref.copy()
    ref_stored[100:110] = -9999
    valid = np.isfinite(pred)
    valid[100:110] = False
    return (
        write_float(tmp_path / "pred.tif", pred),
        write_float(tmp_path / "ref.tif", ref_stored, nodata=-9999),
        pred,
        ref,
        valid,
    )


def test_evaluate_writes_metrics_equal_to_a_direct_computation_and_figures(tmp_path: Path, pair: tuple) -> None:
    pred_path, ref_path, pred, ref, valid = pair
    evaluate_rasters(pred_path, ref_path, tmp_path / "eval", window_blocks=(1, 2))
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    direct = CanopyMetrics(blocks_from_updates=False)
    direct.update(pred, ref, valid)
    blocks = BlockR2(50, 3)
    blocks.update(pred, ref, valid)
    expected = direct.result()
    for key in ("mae", "rmse", "r2", "bias", "nmae", "iou_2m", "iou_5m"):
        assert written[key] == pytest.approx(expected[key], rel=1e-5), key
    assert written["n_pixels"] == valid.sum() == expected["n_pixels"]
    assert written["block_r2"] == pytest.approx(blocks.result(), rel=1e-6) and written["n_blocks"] == 20
    assert written["per_bin"]["5-10"]["n"] == expected["per_bin"]["5-10"]["n"]
    assert written["resampling"] == "bilinear" and written["units"] == "m"
    for name in ("pred_vs_ref_density.png", "maps.png"):
        image = matplotlib.image.imread(tmp_path / "eval" / name)
        assert image.ndim == 3 and image.shape[0] > 300 and image.std() > 0.05


def test_evaluate_aligns_a_reference_in_another_crs(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:200, 0:220]
    ref = (15 + 8 * np.sin(xx / 17.0) * np.cos(yy / 23.0)).astype(np.float32)
    pred_path = write_float(tmp_path / "pred.tif", ref + 1.0)
    utm = write_float(tmp_path / "ref_utm.tif", ref)
    with rasterio.open(utm) as src:
        transform, width, height = calculate_default_transform(src.crs, "EPSG:3857", src.width, src.height, *src.bounds)
        profile = src.profile | {"crs": "EPSG:3857", "transform": transform, "width": width, "height": height}
        with rasterio.open(tmp_path / "ref_3857.tif", "w", **profile) as dst:
            reproject(rasterio.band(src, 1), rasterio.band(dst, 1), resampling=Resampling.bilinear)
    result = evaluate_rasters(pred_path, tmp_path / "ref_3857.tif", tmp_path / "eval")
    assert result["bias"] == pytest.approx(1.0, abs=0.05)
    assert result["mae"] == pytest.approx(1.0, abs=0.1)
    assert result["n_pixels"] > 0.9 * ref.size


def test_evaluate_cli_reports_and_returns_zero(tmp_path: Path, pair: tuple, capsys: pytest.CaptureFixture) -> None:
    pred_path, ref_path, *_ = pair
    assert main(["canopy", "evaluate", str(pred_path), str(ref_path), "--out", str(tmp_path / "cli")]) == 0
    assert "MAE" in capsys.readouterr().out
    assert (tmp_path / "cli" / "metrics.json").exists()


def test_evaluate_cli_errors_name_file_field_and_fix(
    tmp_path: Path, pair: tuple, capsys: pytest.CaptureFixture
) -> None:
    pred_path, ref_path, _, ref, _ = pair
    out = str(tmp_path / "e")
    assert main(["canopy", "evaluate", str(tmp_path / "missing.tif"), str(ref_path), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "missing.tif" in err and "file not found" in err and "fix:" in err

    far = write_float(tmp_path / "far.tif", ref, crs="EPSG:4326", transform=from_origin(10.0, 50.0, 1e-4, 1e-4))
    assert main(["canopy", "evaluate", str(pred_path), str(far), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "far.tif" in err and "does not overlap" in err and "EPSG:4326" in err and "EPSG:32617" in err

    truncated = tmp_path / "truncated.tif"
    data = pred_path.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    assert main(["canopy", "evaluate", str(truncated), str(ref_path), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "truncated.tif" in err and "[pixels]" in err and "corrupt" in err
    assert not (tmp_path / "e" / "metrics.json").exists()


@pytest.fixture
def chm(tmp_path: Path) -> Path:
    heights = np.full((100, 100), 2.0, np.float32)
    heights[:, :50] = 10.0
    heights[:10, :10] = np.nan
    return write_float(tmp_path / "chm.tif", heights)


def plots_in_wgs84() -> gpd.GeoDataFrame:
    x0, y0 = ORIGIN
    shapes = [
        box(x0, y0 - 20, x0 + 20, y0),  # 10 m crowns, a quarter nodata
        box(x0 + 40, y0 - 60, x0 + 60, y0 - 40),  # half 10 m, half 2 m
        box(x0 + 90, y0 - 100, x0 + 110, y0 - 90),
    ]  # 2 m, half outside the raster
    plots = gpd.GeoDataFrame({"plot": ["a", "b", "c"], "owner": ["x", "y", "z"]}, geometry=shapes, crs="EPSG:32617")
    return plots.to_crs("EPSG:4326")


@pytest.mark.parametrize("suffix", [".gpkg", ".parquet", ".shp"])
def test_zonal_statistics_per_polygon_keep_attributes(tmp_path: Path, chm: Path, suffix: str) -> None:
    polygons = tmp_path / f"plots{suffix}"
    plots = plots_in_wgs84()
    plots.to_parquet(polygons) if suffix == ".parquet" else plots.to_file(polygons)
    assert main(["canopy", "zonal", str(chm), str(polygons), str(tmp_path / "stats.gpkg")]) == 0
    stats = gpd.read_file(tmp_path / "stats.gpkg")
    assert list(stats["plot"]) == ["a", "b", "c"] and list(stats["owner"]) == ["x", "y", "z"]
    assert stats.crs.to_epsg() == 4326
    a, b, c = (stats.iloc[i] for i in range(3))
    assert (a["mean"], a["p50"], a["p95"], a["cover"]) == pytest.approx((10, 10, 10, 1.0), abs=1e-3)
    assert a["n_pixels"] == pytest.approx(300, abs=0.5) and a["nodata_fraction"] == pytest.approx(0.25, abs=0.01)
    assert b["mean"] == pytest.approx(6.0, abs=0.05) and b["cover"] == pytest.approx(0.5, abs=0.01)
    assert 9.0 < b["p95"] <= 10.0 and b["nodata_fraction"] == pytest.approx(0.0, abs=0.01)
    assert c["mean"] == pytest.approx(2.0) and c["cover"] == 0.0
    assert c["n_pixels"] == pytest.approx(100, abs=0.5) and c["nodata_fraction"] == pytest.approx(0.5, abs=0.01)


def test_zonal_cover_threshold_option(tmp_path: Path, chm: Path) -> None:
    plots_in_wgs84().to_file(tmp_path / "plots.gpkg")
    assert (
        main(
            [
                "canopy",
                "zonal",
                str(chm),
                str(tmp_path / "plots.gpkg"),
                str(tmp_path / "s.gpkg"),
                "--cover-threshold",
                "1",
            ]
        )
        == 0
    )
    assert gpd.read_file(tmp_path / "s.gpkg")["cover"].tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_zonal_cli_errors(tmp_path: Path, chm: Path, capsys: pytest.CaptureFixture) -> None:
    plots_in_wgs84().iloc[:0].to_file(tmp_path / "empty.gpkg")
    assert main(["canopy", "zonal", str(chm), str(tmp_path / "empty.gpkg"), str(tmp_path / "o.gpkg")]) == 2
    err = capsys.readouterr().err
    assert "empty.gpkg" in err and "no polygons" in err and "fix:" in err
    assert not (tmp_path / "o.gpkg").exists()

    plots_in_wgs84().to_file(tmp_path / "plots.gpkg")
    assert (
        main(["canopy", "zonal", str(tmp_path / "nope.tif"), str(tmp_path / "plots.gpkg"), str(tmp_path / "o.gpkg")])
        == 2
    )
    assert "nope.tif" in capsys.readouterr().err

    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(chm.read_bytes()[: chm.stat().st_size // 2])
    assert main(["canopy", "zonal", str(truncated), str(tmp_path / "plots.gpkg"), str(tmp_path / "o.gpkg")]) == 2
    assert "truncated.tif" in capsys.readouterr().err
    assert not (tmp_path / "o.gpkg").exists()
