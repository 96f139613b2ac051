"""Under umask 022 every command's outputs are 0644 files in 0755 directories, like any other tool's: a
collaborator on a shared cluster can read the COGs, tables, weights and reports."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import geopandas as gpd
import pytest
import rasterio
from shapely.geometry import box

from core.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHORT_PRETRAIN = [
    "train.max_iters=2",
    "optim.epoch_length=2",
    "optim.epochs=1",
    "optim.warmup_epochs=0",
    "teacher.warmup_teacher_temp_epochs=0",
    "optim.freeze_last_layer_epochs=0",
    "train.num_workers=0",
]


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _polygons(chm: Path, out: Path) -> Path:
    with rasterio.open(chm) as src:
        left, bottom, right, top = src.bounds
        crs = src.crs
    plots = gpd.GeoDataFrame({"plot": ["a"]}, geometry=[box(left, bottom, (left + right) / 2, top)], crs=crs)
    plots.to_file(out, driver="GPKG")
    return out


def test_every_command_writes_0644_files_in_0755_directories(
    tmp_path: Path, umask_022: None, make_tiny_models: Callable[[Path], dict[str, Path]]
) -> None:
    (tmp_path / "in").mkdir()
    given = make_tiny_models(tmp_path / "in")
    out = tmp_path / "out"
    forest, screen = out / "forest", out / "screen"
    assert main(["canopy", "synth", str(forest), "--size", "64"]) == 0
    rgb, chm = sorted(forest.glob("*_rgb.tif"))[0], sorted(forest.glob("*_chm.tif"))[0]
    polygons = _polygons(chm, tmp_path / "in" / "plots.gpkg")
    plate_args = ["--plates", "1", "--rows", "3", "--cols", "3", "--fields", "1", "--size", "64"]
    commands = [
        ["weights", "convert", str(given["weights"]), str(out / "converted" / "vit.safetensors")],
        ["canopy", "predict", str(rgb), "--model", str(given["canopy"]), "--out", str(out / "pred" / "chm.tif")],
        ["canopy", "evaluate", str(chm), str(chm), "--out", str(out / "eval")],
        [
            "canopy",
            "fit",
            str(ROOT / "recipes" / "tiny" / "canopy_fit.yaml"),
            "--output-dir",
            str(out / "fit"),
            "optim.epochs=1",
            "train.progress=false",
        ],
        ["canopy", "zonal", str(chm), str(polygons), str(out / "zonal" / "plots.gpkg")],
        ["cells", "synth", str(screen), *plate_args],
        [
            "cells",
            "embed",
            str(screen / "plate1.ome.zarr"),
            "--weights",
            str(given["weights"]),
            "--channels",
            "DNA,RNA,ER",
            "--out",
            str(out / "emb"),
        ],
        [
            "cells",
            "profile",
            str(out / "emb"),
            "--platemap",
            str(screen / "platemap.csv"),
            "--out",
            str(out / "profiles" / "p.parquet"),
        ],
        [
            "cells",
            "evaluate",
            str(out / "profiles" / "p.parquet"),
            "--out",
            str(out / "cells_eval"),
            "--null-size",
            "100",
        ],
        [
            "cells",
            "fit-head",
            str(out / "emb"),
            "--platemap",
            str(screen / "platemap.csv"),
            "--out",
            str(out / "head"),
            "--epochs",
            "2",
        ],
        [
            "pretrain",
            str(ROOT / "recipes" / "tiny" / "pretrain.yaml"),
            "--output-dir",
            str(out / "run"),
            *SHORT_PRETRAIN,
        ],
        ["export", str(out / "run"), str(out / "export" / "vit.safetensors")],
        [
            "launch",
            str(ROOT / "recipes" / "tiny" / "pretrain.yaml"),
            "--output-dir",
            str(out / "launched"),
            *SHORT_PRETRAIN,
        ],
        [
            "eval",
            "knn",
            str(out / "export" / "vit.safetensors"),
            "--kind",
            "synthetic_shapes",
            "--train",
            "n=64",
            "--val",
            "n=32",
            "seed=1",
            "--size",
            "32",
            "--k",
            "5",
            "--out",
            str(out / "knn" / "knn.json"),
        ],
    ]
    for argv in commands:
        assert main(argv) == 0, argv
    wrong = []
    for path in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        expected = 0o755 if path.is_dir() else 0o644
        if mode != expected:
            wrong.append(f"{oct(mode)} {path.relative_to(out)}")
    assert not wrong, "\n".join(wrong[:30])
    assert len(list(out.rglob("*.png"))) >= 3 and (out / "cells_eval" / "report.html").exists()
