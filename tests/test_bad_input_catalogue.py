"""A catalogue of bad inputs across every command: each gives one clear message, the right exit status, no
traceback, and leaves nothing behind.

Each case is ``(arguments, exit status, words the message must contain)``. Placeholders in braces name the
fixtures below ({tmp} is the case's own empty output area). Most cases fail during validation, so the table is
cheap; a few reach a library (rasterio, tifffile, zarr) to check that its failure is translated."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import rasterio

from bio.synthetic import make_plate
from core.cli import main
from geodino.synthetic import make_forest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"
UNWRITABLE = "/sys/dinoscope_catalogue"  # EACCES even for root on Linux

PRETRAIN = ["pretrain", "{tiny}/pretrain.yaml", "--output-dir", "{tmp}/run"]
PREDICT = ["canopy", "predict", "{rgb}", "--model", "{model}", "--out", "{tmp}/chm.tif"]
EMBED = ["cells", "embed", "{plate}", "--weights", "{weights}", "--out", "{tmp}/emb"]
FIT_HEAD = ["cells", "fit-head", "{dir}", "--platemap", "{platemap}", "--out", "{tmp}/head"]
PROFILE = ["cells", "profile", "{dir}", "--platemap", "{platemap}", "--out", "{tmp}/p.parquet"]
EVAL_CELLS = ["cells", "evaluate", "{garbage}", "--out", "{tmp}/e"]
ZONAL_POINTS = ["canopy", "zonal", "{chm}", "{points}", "{tmp}/z.gpkg"]
ZONAL_CSV = ["canopy", "zonal", "{chm}", "{plots_csv}", "{tmp}/z.csv"]
FIT = ["canopy", "fit", "{tiny}/canopy_fit.yaml", "--output-dir", "{tmp}/run"]

CASES: list[tuple[str, list[str], int, list[str]]] = [
    # -- pretrain
    ("pretrain-missing-recipe", ["pretrain", "{tmp}/nope.yaml"], 2, ["recipe not found", "nope.yaml"]),
    ("pretrain-recipe-is-dir", ["pretrain", "{dir}"], 2, ["is a directory"]),
    ("pretrain-kind-typo", ["pretrain", "{kind_typo}"], 2, ["'pretrian'", "did you mean 'pretrain'"]),
    ("pretrain-bad-yaml", ["pretrain", "{bad_yaml}"], 2, ["not valid YAML", "bad.yaml"]),
    ("pretrain-unknown-key", [*PRETRAIN, "optim.bse_lr=0.1"], 2, ["optim.bse_lr", "base_lr"]),
    ("pretrain-wrong-type", [*PRETRAIN, "optim.epochs=many"], 2, ["wrong type", "optim.epochs"]),
    ("pretrain-negative-lr", [*PRETRAIN, "optim.base_lr=-0.001"], 2, ["optim.base_lr"]),
    ("pretrain-zero-epochs", [*PRETRAIN, "optim.epochs=0"], 2, ["optim.epochs"]),
    ("pretrain-zero-batch", [*PRETRAIN, "train.batch_size_per_rank=0"], 2, ["train.batch_size_per_rank"]),
    ("pretrain-unknown-data-kind", [*PRETRAIN, "data.kind=shapez"], 2, ["shapez", "synthetic_shapes"]),
    ("pretrain-unknown-data-param", [*PRETRAIN, "data.params.nn=3"], 2, ["nn", "valid keys"]),
    ("pretrain-unknown-arch", [*PRETRAIN, "model.arch=vit_enormous"], 2, ["vit_enormous"]),
    ("pretrain-unknown-device", [*PRETRAIN, "train.device=tpu"], 2, ["tpu"]),
    ("pretrain-cuda-missing", [*PRETRAIN, "train.device=cuda"], 2, ["CUDA"]),
    ("pretrain-unwritable", ["pretrain", "{tiny}/pretrain.yaml", "--output-dir", UNWRITABLE], 2, [UNWRITABLE]),
    ("pretrain-two-recipes", ["pretrain", "{tiny}/pretrain.yaml", "--recipe", "{tiny}/pretrain.yaml"], 2, ["two"]),
    # -- export
    ("export-not-a-run", ["export", "{dir}", "{tmp}/w.safetensors"], 2, ["not a run directory"]),
    ("export-negative-step", ["export", "{dir}", "{tmp}/w.safetensors", "--step", "-5"], 2, ["step", "range"]),
    ("export-missing-run", ["export", "{tmp}/nope", "{tmp}/w.safetensors"], 2, ["nope"]),
    # -- eval
    ("knn-missing-weights", ["eval", "knn", "{tmp}/w.pth", "--kind", "synthetic_shapes"], 2, ["w.pth"]),
    ("knn-k-zero", ["eval", "knn", "{weights}", "--k", "0,-1"], 2, ["k", "range"]),
    ("knn-size-small", ["eval", "knn", "{weights}", "--size", "4"], 2, ["size", "range"]),
    ("knn-size-not-multiple", ["eval", "knn", "{weights}", "--size", "30", "--kind", "synthetic_shapes"], 2, ["30"]),
    ("knn-unknown-kind", ["eval", "knn", "{weights}", "--kind", "shapez"], 2, ["shapez"]),
    ("knn-unknown-param", ["eval", "knn", "{weights}", "--kind", "synthetic_shapes", "--train", "nn=3"], 2, ["nn"]),
    ("linear-zero-epochs", ["eval", "linear", "{weights}", "--epochs", "0"], 2, ["epochs", "range"]),
    ("linear-zero-blocks", ["eval", "linear", "{weights}", "--n-last-blocks", "0"], 2, ["n_last_blocks"]),
    # -- weights
    ("inspect-missing", ["weights", "inspect", "{tmp}/w.pth"], 2, ["w.pth"]),
    ("inspect-garbage", ["weights", "inspect", "{garbage}"], 2, ["garbage.tif"]),
    ("inspect-heads", ["weights", "inspect", "{weights}", "--num-heads", "7"], 2, ["num_heads", "7"]),
    ("inspect-huge-channels", ["weights", "inspect", "{weights}", "--in-chans", "1000000"], 2, ["in_chans"]),
    ("inspect-bad-format", ["weights", "inspect", "{weights}", "--format", "onnx"], 2, ["invalid choice"]),
    ("inspect-bad-mean", ["weights", "inspect", "{weights}", "--mean", "a,b"], 2, ["mean"]),
    ("convert-suffix", ["weights", "convert", "{weights}", "{tmp}/w.pt"], 2, [".safetensors"]),
    ("convert-unwritable", ["weights", "convert", "{weights}", UNWRITABLE + "/w.safetensors"], 2, [UNWRITABLE]),
    # -- launch
    ("launch-unknown-kind", ["launch", "{kind_typo}"], 2, ["pretrian"]),
    ("launch-bad-launcher", ["launch", "{tiny}/pretrain.yaml", "--launcher", "mpi"], 2, ["invalid choice"]),
    ("launch-zero-procs", ["launch", "{tiny}/pretrain.yaml", "--launcher", "torchrun", "--nproc", "0"], 2, ["nproc"]),
    ("launch-no-recipe", ["launch"], 2, ["no recipe"]),
    ("launch-bad-time", ["launch", "{tiny}/pretrain.yaml", "--launcher", "slurm", "--time", "soon"], 2, ["time"]),
    # -- canopy synth
    ("synth-size-zero", ["canopy", "synth", "{tmp}/f", "--size", "0"], 2, ["size", "range"]),
    ("synth-res-zero", ["canopy", "synth", "{tmp}/f", "--res", "0"], 2, ["res", "range"]),
    ("synth-crs-garbage", ["canopy", "synth", "{tmp}/f", "--crs", "garbage"], 2, ["crs", "garbage"]),
    ("synth-crs-degrees", ["canopy", "synth", "{tmp}/f", "--crs", "EPSG:4326"], 2, ["geographic"]),
    ("synth-scenes-negative", ["canopy", "synth", "{tmp}/f", "--scenes", "-1"], 2, ["scenes"]),
    ("synth-huge", ["canopy", "synth", "{tmp}/f", "--size", "300000"], 2, ["memory", "size"]),
    ("synth-out-is-file", ["canopy", "synth", "{garbage}/f"], 2, ["garbage.tif"]),
    ("synth-unwritable", ["canopy", "synth", UNWRITABLE, "--size", "64"], 2, [UNWRITABLE]),
    # -- canopy fit
    ("fit-missing-recipe", ["canopy", "fit", "{tmp}/nope.yaml"], 2, ["recipe not found"]),
    ("fit-wrong-kind", ["canopy", "fit", "{tiny}/canopy_predict.yaml"], 2, ["canopy_fit", "canopy_predict"]),
    ("fit-zero-epochs", ["canopy", "fit", "{tiny}/canopy_fit.yaml", "optim.epochs=0"], 2, ["optim.epochs"]),
    ("fit-unknown-key", ["canopy", "fit", "{tiny}/canopy_fit.yaml", "optim.epoch=3"], 2, ["optim.epoch", "epochs"]),
    # -- canopy predict
    ("predict-no-inputs", ["canopy", "predict", "--model", "{model}", "--out", "{tmp}/c.tif"], 2, ["inputs"]),
    ("predict-no-model", ["canopy", "predict", "{rgb}", "--out", "{tmp}/c.tif"], 2, ["model"]),
    ("predict-missing-model", ["canopy", "predict", "{rgb}", "--model", "{tmp}/m", "--out", "{tmp}/c.tif"], 2, ["m"]),
    (
        "predict-garbage-model",
        ["canopy", "predict", "{rgb}", "--model", "{garbage}", "--out", "{tmp}/c"],
        2,
        ["garbage"],
    ),
    ("predict-missing-input", [*PREDICT[:2], "{tmp}/nope.tif", *PREDICT[3:]], 2, ["nope.tif"]),
    ("predict-garbage-input", [*PREDICT[:2], "{garbage}", *PREDICT[3:]], 2, ["garbage.tif"]),
    ("predict-tile-zero", [*PREDICT, "tile=0"], 2, ["tile", "range"]),
    ("predict-tile-huge", [*PREDICT, "--tile", "1000000", "--overlap", "0"], 2, ["memory", "tile"]),
    ("predict-overlap", [*PREDICT, "--tile", "64", "--overlap", "64"], 2, ["overlap"]),
    ("predict-uint16-scale", [*PREDICT, "--dtype", "uint16", "--uint16-scale", "1e6"], 2, ["uint16_scale"]),
    ("predict-dtype", [*PREDICT, "--dtype", "float64"], 2, ["invalid choice"]),
    ("predict-batch-zero", [*PREDICT, "--batch-size", "0"], 2, ["batch_size"]),
    ("predict-cuda", [*PREDICT, "--device", "cuda"], 2, ["CUDA"]),
    ("predict-device", [*PREDICT, "--device", "tpu"], 2, ["tpu"]),
    ("predict-band-name", [*PREDICT, "--bands", "nir"], 2, ["nir"]),
    ("predict-band-index", [*PREDICT, "--bands", "9"], 2, ["9"]),
    ("predict-wrong-band-count", [*PREDICT[:2], "{chm}", *PREDICT[3:]], 2, ["bands"]),
    ("predict-unwritable", [*PREDICT[:-1], UNWRITABLE + "/c.tif"], 2, [UNWRITABLE]),
    ("predict-range-reversed", [*PREDICT, "--input-range", "10,5"], 2, ["input_range", "LOW < HIGH"]),
    ("predict-range-words", [*PREDICT, "--input-range", "bright"], 2, ["input_range"]),
    ("predict-range-and-scale", [*PREDICT, "--input-range", "0,1", "--input-scale", "2"], 2, ["input_scale"]),
    ("predict-scale-negative", [*PREDICT, "--input-scale", "-1"], 2, ["input_scale", "range"]),
    ("predict-hrch-blocks", [*PREDICT, "--hrch-blocks=-1,2"], 2, ["hrch_blocks", "range"]),
    ("predict-uint16-input", [*PREDICT[:2], "{rgb16}", *PREDICT[3:]], 2, ["uint16", "uint8", "--input-range"]),
    ("predict-two-inputs-one-tif", [*PREDICT[:3], "{rgb}", *PREDICT[3:]], 2, ["directory", "--mosaic"]),
    # -- canopy evaluate
    ("evaluate-block-zero", ["canopy", "evaluate", "{chm}", "{chm}", "--out", "{tmp}/e", "--block", "0"], 2, ["block"]),
    ("evaluate-trim", ["canopy", "evaluate", "{chm}", "{chm}", "--out", "{tmp}/e", "--trim", "-3"], 2, ["trim"]),
    ("evaluate-no-out", ["canopy", "evaluate", "{chm}", "{chm}"], 2, ["out"]),
    ("evaluate-missing-ref", ["canopy", "evaluate", "{chm}", "{tmp}/r.tif", "--out", "{tmp}/e"], 2, ["r.tif"]),
    ("evaluate-garbage-pred", ["canopy", "evaluate", "{garbage}", "{chm}", "--out", "{tmp}/e"], 2, ["garbage"]),
    ("evaluate-resampling", ["canopy", "evaluate", "{chm}", "{chm}", "--out", "{tmp}/e", "--resampling", "x"], 2, []),
    # -- canopy zonal
    ("zonal-missing-raster", ["canopy", "zonal", "{tmp}/r.tif", "{polygons}", "{tmp}/z.gpkg"], 2, ["r.tif"]),
    ("zonal-missing-polygons", ["canopy", "zonal", "{chm}", "{tmp}/p.gpkg", "{tmp}/z.gpkg"], 2, ["p.gpkg"]),
    ("zonal-band-zero", ["canopy", "zonal", "{chm}", "{polygons}", "{tmp}/z.gpkg", "--band", "0"], 2, ["band"]),
    ("zonal-band-missing", ["canopy", "zonal", "{chm}", "{polygons}", "{tmp}/z.gpkg", "--band", "4"], 2, ["band"]),
    ("zonal-cover", ["canopy", "zonal", "{chm}", "{polygons}", "{tmp}/z.gpkg", "--cover-threshold", "-1"], 2, []),
    ("zonal-garbage-polygons", ["canopy", "zonal", "{chm}", "{garbage}", "{tmp}/z.gpkg"], 2, ["garbage"]),
    ("zonal-buffer-negative", [*ZONAL_POINTS, "--buffer", "-1"], 2, ["buffer", "range"]),
    ("zonal-points-no-buffer", ZONAL_POINTS, 2, ["points", "--buffer"]),
    ("zonal-buffer-polygons", [*ZONAL_POINTS[:3], "{polygons}", "{tmp}/z.gpkg", "--buffer", "5"], 2, ["polygons"]),
    ("zonal-csv-no-crs", [*ZONAL_CSV, "--buffer", "5"], 2, ["no CRS", "--crs"]),
    ("zonal-csv-bad-crs", [*ZONAL_CSV, "--buffer", "5", "--crs", "EPSG:9999999"], 2, ["EPSG:9999999"]),
    ("zonal-csv-no-column", [*ZONAL_CSV, "--buffer", "5", "--crs", "EPSG:4326", "--x-column", "e"], 2, ["'e'"]),
    ("zonal-column-clash", [*ZONAL_CSV, "--buffer", "5", "--crs", "EPSG:4326"], 2, ["['mean']", "--prefix"]),
    ("zonal-csv-output-format", [*ZONAL_CSV[:4], "{tmp}/z.xlsx"], 2, [".xlsx", ".csv"]),
    # -- canopy inspect
    ("inspect-raster-missing", ["canopy", "inspect", "{tmp}/r.tif"], 2, ["r.tif", "file not found"]),
    ("inspect-raster-garbage", ["canopy", "inspect", "{garbage}"], 2, ["garbage.tif"]),
    ("inspect-model-garbage", ["canopy", "inspect", "{rgb}", "--model", "{garbage}"], 2, ["garbage.tif"]),
    ("inspect-range", ["canopy", "inspect", "{rgb}", "--model", "{model}", "--input-range", "1"], 2, ["input_range"]),
    ("inspect-band", ["canopy", "inspect", "{rgb}", "--bands", "nir"], 2, ["nir"]),
    # -- canopy fit on tiles
    ("fit-images-no-chm", [*FIT, "data.images=[{rgb}]"], 2, ["data.chm"]),
    ("fit-images-glob-empty", [*FIT, "data.images=[{tmp}/none/*.tif]", "data.chm={chm}"], 2, ["no raster files"]),
    ("fit-chm-missing", [*FIT, "data.images=[{rgb}]", "data.chm={tmp}/c.tif"], 2, ["c.tif"]),
    ("fit-range-reversed", [*FIT, "data.input_range=9,1"], 2, ["data.input_range"]),
    ("fit-uint16-dtype-max", [*FIT, "data.pairs=[[{rgb16},{chm}]]"], 2, ["data.dtype_max", "uint16"]),
    # -- cells synth
    ("cells-synth-plates", ["cells", "synth", "{tmp}/s", "--plates", "0"], 2, ["plates", "range"]),
    ("cells-synth-rows", ["cells", "synth", "{tmp}/s", "--rows", "100"], 2, ["rows", "range"]),
    ("cells-synth-ngff", ["cells", "synth", "{tmp}/s", "--ngff", "0.3"], 2, ["invalid choice"]),
    ("cells-synth-size", ["cells", "synth", "{tmp}/s", "--size", "8"], 2, ["size"]),
    ("cells-synth-small-plate", ["cells", "synth", "{tmp}/s", "--rows", "1", "--cols", "2"], 2, ["wells"]),
    ("cells-synth-too-many-defects", ["cells", "synth", "{tmp}/s", "--saturated-wells", "99"], 2, ["cannot plant"]),
    # -- cells embed
    ("embed-no-sources", ["cells", "embed", "--weights", "{weights}", "--out", "{tmp}/emb"], 2, ["plates"]),
    ("embed-no-weights", ["cells", "embed", "{plate}", "--out", "{tmp}/emb"], 2, ["weights"]),
    ("embed-missing-source", ["cells", "embed", "{tmp}/p.zarr", "--weights", "{weights}", "--out", "{tmp}/e"], 2, []),
    ("embed-missing-weights", [*EMBED[:4], "{tmp}/w.pth", *EMBED[5:]], 2, ["w.pth"]),
    ("embed-table-no-table", [*EMBED, "--centroids", "table"], 2, ["data.nuclei_table"]),
    ("embed-crop-zero", [*EMBED, "--crop-size", "0"], 2, ["crops.size", "range"]),
    ("embed-batch-zero", [*EMBED, "model.batch_size=0"], 2, ["model.batch_size"]),
    ("embed-unknown-channel", [*EMBED, "--channels", "DNA,Actin9"], 2, ["Actin9"]),
    ("embed-precision", [*EMBED, "--precision", "fp8"], 2, ["invalid choice"]),
    ("embed-cuda", [*EMBED, "--device", "cuda"], 2, ["CUDA"]),
    ("embed-channel-map", [*EMBED, "--channel-map", "OrigDNA"], 2, ["'OrigDNA' is not OLD=NEW"]),
    ("embed-empty-folder", ["cells", "embed", "{dir}", "--weights", "{weights}", "--out", "{tmp}/e"], 2, ["no .tif"]),
    ("embed-name-pattern", [*EMBED[:2], "{dir}", *EMBED[3:], "--name-pattern", "(?P<plate"], 2, ["regular expression"]),
    ("embed-format", [*EMBED, "--format", "h5ad"], 2, ["invalid choice"]),
    ("embed-focus-ratio", [*EMBED, "--min-focus-ratio", "1.5"], 2, ["qc.min_focus_ratio", "range"]),
    # -- cells fit-head, profile, evaluate
    ("fit-head-holdout", [*FIT_HEAD, "--holdout-fraction", "1.5"], 2, ["holdout_fraction"]),
    ("fit-head-epochs", [*FIT_HEAD, "--epochs", "0"], 2, ["epochs"]),
    ("fit-head-no-run", ["cells", "fit-head", "{tmp}/run", "--platemap", "{platemap}", "--out", "{tmp}/h"], 2, []),
    ("fit-head-no-platemap", ["cells", "fit-head", "{dir}", "--out", "{tmp}/h"], 2, ["platemap"]),
    ("profile-no-run", ["cells", "profile", "{tmp}/run", "--platemap", "{platemap}", "--out", "{tmp}/p"], 2, ["run"]),
    ("profile-aggregate", [*PROFILE, "--aggregate", "max"], 2, ["invalid choice"]),
    ("profile-no-out", ["cells", "profile", "{dir}", "--platemap", "{platemap}"], 2, ["out"]),
    ("profile-not-a-run", PROFILE, 2, ["embeddings"]),
    ("profile-feature-prefix", [*PROFILE, "--feature-prefix", "Metadata_f"], 2, ["feature prefix 'Metadata_f'"]),
    ("profile-jump-column", [*PROFILE, "--treatment-column", "Metadata_pert_iname"], 2, ["Metadata_pert_iname"]),
    ("evaluate-cells-knn", [*EVAL_CELLS, "--knn-k", "0"], 2, ["knn_k"]),
    ("evaluate-cells-threshold", [*EVAL_CELLS, "--threshold", "2"], 2, ["threshold"]),
    ("evaluate-cells-null", [*EVAL_CELLS, "--null-size", "0"], 2, ["null_size"]),
    ("evaluate-cells-replicates", [*EVAL_CELLS, "--min-replicates", "1"], 2, ["min_replicates", "range"]),
    ("evaluate-cells-garbage", EVAL_CELLS, 2, ["garbage.tif"]),
    # -- demo
    ("demo-out-is-file", ["demo", "--out", "{garbage}"], 2, ["garbage.tif"]),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, make_tiny_models: Any) -> dict[str, str]:
    """Valid inputs next to bad ones; built once for the whole catalogue."""
    root = tmp_path_factory.mktemp("catalogue-inputs")
    rgb, chm = make_forest(root / "forest", size=64, seed=0)
    models = make_tiny_models(root)
    weights, model = models["weights"], models["canopy"]
    with rasterio.open(rgb) as src:
        profile = dict(src.profile, dtype="uint16", nodata=None)
        with rasterio.open(root / "rgb16.tif", "w", **profile) as dst:
            dst.write(src.read().astype("uint16") * 257)
    (root / "garbage.tif").write_text("not an image\n")
    (root / "adir").mkdir()
    (root / "kind.yaml").write_text("kind: pretrian\noptim: {epochs: 1}\n")
    (root / "bad.yaml").write_text("optim: {epochs: 1\n")
    (root / "platemap.csv").write_text("plate,well,treatment,role\nplate1,A01,dmso,negative_control\n")
    screen = make_plate(root / "screen", plates=1, n_rows=3, n_cols=3, fields=1, size=64)
    square = [[[-81.0, 0.0], [-80.99, 0.0], [-80.99, 0.01], [-81.0, 0.01], [-81.0, 0.0]]]
    feature = {"type": "Feature", "properties": {"plot": "a"}, "geometry": {"type": "Polygon", "coordinates": square}}
    (root / "polygons.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    point = {"type": "Feature", "properties": {"plot": "a"}, "geometry": {"type": "Point", "coordinates": [-81, 0]}}
    (root / "points.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [point]}))
    (root / "plots.csv").write_text("plot,lon,lat,mean\na,-80.99,0.001,3\n")
    return {
        "rgb": str(rgb),
        "chm": str(chm),
        "model": str(model),
        "weights": str(weights),
        "garbage": str(root / "garbage.tif"),
        "dir": str(root / "adir"),
        "kind_typo": str(root / "kind.yaml"),
        "bad_yaml": str(root / "bad.yaml"),
        "platemap": str(root / "platemap.csv"),
        "plate": str(screen.plates[0]),
        "polygons": str(root / "polygons.geojson"),
        "points": str(root / "points.geojson"),
        "plots_csv": str(root / "plots.csv"),
        "rgb16": str(root / "rgb16.tif"),
        "tiny": str(TINY),
    }


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_the_catalogue_covers_every_command() -> None:
    assert len(CASES) >= 80
    assert len({case[0] for case in CASES}) == len(CASES)
    covered = {" ".join(a for a in argv[:2] if not a.startswith("{")) for _, argv, _, _ in CASES}
    for command in ("pretrain", "export", "eval knn", "eval linear", "weights inspect", "weights convert", "launch"):
        assert any(c.startswith(command) for c in covered), command
    for group, subs in {
        "canopy": "synth fit predict evaluate zonal inspect",
        "cells": "synth embed fit-head profile evaluate",
    }.items():
        for sub in subs.split():
            assert f"{group} {sub}" in covered, f"{group} {sub}"


@pytest.mark.parametrize(("name", "argv", "status", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(
    name: str, argv: list[str], status: int, words: list[str], inputs: dict[str, str], tmp_path: Path, capsys
) -> None:
    if UNWRITABLE in " ".join(argv) and os.access("/sys", os.W_OK) and Path("/sys").is_dir() is False:
        pytest.skip("no unwritable location on this machine")
    before = {k: _tree(Path(v).parent) for k, v in inputs.items() if k in ("rgb", "weights")}
    args = [a.format(tmp=tmp_path, **inputs) for a in argv]
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse usage errors exit from inside the parser
        code = exit_.code
    captured = capsys.readouterr()
    message = captured.err
    assert "Traceback" not in message, message
    assert code == status, f"exit {code}, expected {status}: {message}"
    assert "unexpected" not in message, message
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"
    assert not list(tmp_path.iterdir()), f"left behind: {sorted(_tree(tmp_path))}"
    assert {k: _tree(Path(inputs[k]).parent) for k in before} == before
