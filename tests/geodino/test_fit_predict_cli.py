"""`canopy fit` / `canopy predict`: a fitted head beats the mean on held-out forests; model files; CLI; recipes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from core.cli import main
from core.config import load_recipe
from core.errors import DinoscopeError
from core.launch.kinds import RecipeKind
from core.weights import save_backbone
from geodino.config import CanopyFitRecipe, CanopyPredictRecipe
from geodino.fit import fit_canopy
from geodino.kinds import canopy_fit_kind, canopy_predict_kind
from geodino.metrics import RegressionAccumulator
from geodino.model import backbone_head_model, load_canopy_model, random_backbone, save_canopy_model
from geodino.normalise import BandNormaliser
from geodino.raster import RasterSource
from geodino.synthetic import make_forest

REPO = Path(__file__).parents[2]
TINY_FIT = REPO / "recipes" / "tiny" / "canopy_fit.yaml"
HELD_OUT_SEEDS = (100, 101, 102, 103)


def run_cli(argv: list[str]) -> int:
    """``dinoscope -v canopy ARGV`` (``-v`` lets a DinoscopeError through, so tests can inspect it)."""
    return main(["-v", "canopy", *argv])


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster than 2 contending threads on a shared 2-core machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    run = tmp_path_factory.mktemp("fit")
    assert run_cli(["fit", str(TINY_FIT), "train.progress=false", "--output-dir", str(run)]) == 0
    return run


def test_fit_writes_model_metrics_log_and_plots(fitted: Path) -> None:
    metrics = json.loads((fitted / "metrics.json").read_text())
    assert metrics["n_chips"]["train"] > 20 and metrics["n_chips"]["val"] > 4
    assert metrics["val"]["mae"] < 0.6 * metrics["baseline_train_mean"]["mae"]
    assert metrics["val"]["r2"] > 0.5 > metrics["baseline_train_mean"]["r2"]
    log = [json.loads(line) for line in (fitted / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, 41))
    assert metrics["val"]["mae"] == pytest.approx(min(r["val_mae"] for r in log))  # the best epoch is kept
    written = ("pred_vs_ref.png", "loss_curve.png", "model.safetensors", "model.json", "config.yaml", "run_info.json")
    for name in written:
        assert (fitted / name).stat().st_size > 0
    sidecar = json.loads((fitted / "model.json").read_text())
    assert sidecar["format"] == "dinoscope_canopy" and sidecar["band_names"] == ["red", "green", "blue"]
    assert sidecar["metadata"]["gsd_m"] == 0.5 and sidecar["net"]["layers"] == [0, 1]
    assert not list(fitted.glob(".*tmp*"))


def test_fitted_head_beats_the_mean_on_held_out_forests(fitted: Path, tmp_path: Path) -> None:
    scenes = [make_forest(tmp_path / "scenes", size=256, seed=s) for s in HELD_OUT_SEEDS]
    out_dir = tmp_path / "pred"
    assert (
        run_cli(
            [
                "predict",
                "--model",
                str(fitted / "model.safetensors"),
                *[str(rgb) for rgb, _ in scenes],
                "--out",
                str(out_dir),
                "--tile",
                "128",
                "--overlap",
                "32",
            ]
        )
        == 0
    )
    assert (out_dir / "mosaic.vrt").exists()
    train_mean = json.loads((fitted / "metrics.json").read_text())["train_mean_height_m"]
    model, baseline = RegressionAccumulator(), RegressionAccumulator()
    for rgb, chm in scenes:
        with RasterSource(out_dir / f"{rgb.stem}.tif") as pred, RasterSource(chm) as ref:
            p, p_valid = pred.read(Window(0, 0, 256, 256))
            r, r_valid = ref.read(Window(0, 0, 256, 256))
        model.update(p[0], r[0], p_valid & r_valid)
        baseline.update(np.full_like(r[0], train_mean), r[0], p_valid & r_valid)
    ours, mean_only = model.result(), baseline.result()
    assert ours["r2"] > 0.5 and ours["mae"] < 0.6 * mean_only["mae"], (ours, mean_only)


def test_predict_uncertainty_uint16_and_grid(fitted: Path, tmp_path: Path) -> None:
    rgb, _ = make_forest(tmp_path, size=96, seed=7)
    out = tmp_path / "chm.tif"
    assert (
        run_cli(
            [
                "predict",
                "--model",
                str(fitted / "model.safetensors"),
                str(rgb),
                "--out",
                str(out),
                "--uncertainty",
                "--dtype",
                "uint16",
                "--tile",
                "64",
                "--overlap",
                "16",
            ]
        )
        == 0
    )
    with rasterio.open(rgb) as src, rasterio.open(out) as pred, rasterio.open(tmp_path / "chm_std.tif") as std:
        assert (pred.crs, pred.transform, pred.shape) == (src.crs, src.transform, src.shape)
        assert pred.dtypes[0] == "uint16" and pred.nodata == 65535 and std.dtypes[0] == "uint16"
        heights, spread = pred.read(1), std.read(1)
        nodata = (src.read() == 255).any(axis=0)
    np.testing.assert_array_equal(heights == 65535, nodata)
    assert 0 < heights[~nodata].mean() / 100 < 48 and (spread[~nodata] > 0).all()


def test_wrong_band_count_names_file_and_bands(fitted: Path, tmp_path: Path) -> None:
    path = tmp_path / "two_bands.tif"
    profile = {
        "driver": "GTiff",
        "width": 32,
        "height": 32,
        "count": 2,
        "dtype": "uint8",
        "crs": "EPSG:32617",
        "transform": rasterio.transform.from_origin(0, 0, 0.5, 0.5),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(DinoscopeError) as err:
        run_cli(["predict", "--model", str(fitted / "model.safetensors"), str(path), "--out", str(tmp_path / "o")])
    message = str(err.value)
    assert str(path) in message and "expects 3 bands" in message and "red, green, blue" in message
    with pytest.raises(DinoscopeError, match="backbone weights"):  # backbone weights are not a canopy model
        model, meta = random_backbone("vit_test", 8, 32)
        load_canopy_model(save_backbone(model, meta, tmp_path / "vit.safetensors"))


def test_model_round_trip_embedded_and_by_reference(tmp_path: Path, one_thread: None) -> None:
    torch.manual_seed(0)
    backbone, meta = random_backbone("vit_test", 8, 32)
    head = {"embed_dim": 64, "n_layers": 2, "n_bins": 32, "max_height": 40.0, "bin_rule": "softmax"}
    model = backbone_head_model(
        backbone,
        meta,
        "linear",
        head,
        layers=[0, 1],
        feature_norm=False,
        normaliser=BandNormaliser([10.0] * 3, [50.0] * 3),
        band_names=["r", "g", "b"],
        metadata={"gsd_m": 0.5},
    )
    torch.nn.init.normal_(model.net.head.conv.weight, std=0.5)
    x = torch.randn(2, 3, 30, 45)  # not a multiple of the patch: padded, then cropped back
    expected = model.predict_batch(x)
    assert expected["height"].shape == (2, 30, 45) and expected["std"].shape == (2, 30, 45)
    embedded = save_canopy_model(model, tmp_path / "embedded.safetensors")
    backbone_file = save_backbone(backbone, meta, tmp_path / "backbones" / "vit.safetensors")
    referenced = save_canopy_model(model, tmp_path / "referenced.safetensors", backbone_path=backbone_file)
    assert referenced.stat().st_size < embedded.stat().st_size / 4
    spec = json.loads(referenced.with_suffix(".json").read_text())["net"]
    assert spec["backbone_path"] == "backbones/vit.safetensors"  # relative: the folder can move as a whole
    for path in (embedded, referenced):
        again = load_canopy_model(path)
        assert again.normaliser == model.normaliser and again.band_names == ["r", "g", "b"]
        for key in ("height", "std"):
            torch.testing.assert_close(again.predict_batch(x)[key], expected[key])
    embedded.with_suffix(".json").unlink()  # the header copy of the sidecar still describes the model
    torch.testing.assert_close(load_canopy_model(embedded).predict_batch(x)["height"], expected["height"])
    backbone_file.unlink()
    with pytest.raises(DinoscopeError, match="not found"):
        load_canopy_model(referenced)


def test_feature_cache_is_reused_and_fine_tuning_updates_the_backbone(fitted: Path, tmp_path: Path) -> None:
    rerun = tmp_path / "rerun"
    for part in ("cache", "synthetic"):
        shutil.copytree(fitted / part, rerun / part)  # copy2 keeps modification times
    key = rerun / "cache" / "train" / "key.json"
    stamp = key.stat().st_mtime_ns
    recipe = load_recipe(CanopyFitRecipe, TINY_FIT, ["optim.epochs=1", "head.mode=regression", "train.progress=false"])
    result = fit_canopy(recipe, rerun)  # same backbone, layers and chips: the features come from the cache
    assert key.stat().st_mtime_ns == stamp and result["head"]["mode"] == "regression"
    assert set(load_canopy_model(rerun / "model.safetensors")(torch.zeros(1, 3, 16, 16))) == {"height"}
    recipe = load_recipe(
        CanopyFitRecipe,
        TINY_FIT,
        ["optim.epochs=1", "backbone.frozen=false", "data.synthetic.scenes=1", "train.progress=false"],
    )
    tuned = fit_canopy(recipe, tmp_path / "tuned")
    assert not (tmp_path / "tuned" / "cache").exists() and tuned["frozen"] is False
    torch.manual_seed(recipe.train.seed)
    initial, _ = random_backbone("vit_test", 4, 64)
    reloaded = load_canopy_model(tmp_path / "tuned" / "model.safetensors").net.backbone
    assert not torch.equal(reloaded.patch_embed.proj.weight, initial.patch_embed.proj.weight)


def test_dpt_head_fits_saves_and_reloads(tmp_path: Path, one_thread: None) -> None:
    overrides = [
        "head.type=dpt",
        "head.n_bins=32",
        "head.dpt_channels=16",
        "backbone.patch_size=16",
        "backbone.overrides={depth: 4}",
        "backbone.n_layers=4",
        "optim.epochs=1",
        "optim.lr=0.0001",
        "data.synthetic.scenes=1",
        "train.progress=false",
    ]
    result = fit_canopy(load_recipe(CanopyFitRecipe, TINY_FIT, overrides), tmp_path)
    assert result["head"]["type"] == "dpt" and np.isfinite(result["val"]["mae"])
    model = load_canopy_model(tmp_path / "model.safetensors")
    out = model.predict_batch(torch.zeros(2, 3, 40, 72))  # padded to 48 x 80, cropped back
    assert out["height"].shape == (2, 40, 72) and out["std"].shape == (2, 40, 72)


def test_recipes_validate_and_kinds_resolve() -> None:
    recipes = {
        "tiny/canopy_fit": CanopyFitRecipe,
        "geo/canopy_fit_vitl14": CanopyFitRecipe,
        "tiny/canopy_predict": CanopyPredictRecipe,
        "geo/canopy_predict_hrch": CanopyPredictRecipe,
    }
    for name, schema in recipes.items():
        recipe = load_recipe(schema, REPO / "recipes" / f"{name}.yaml")
        assert isinstance(recipe, schema)
    vitl = load_recipe(CanopyFitRecipe, REPO / "recipes" / "geo" / "canopy_fit_vitl14.yaml")
    assert vitl.backbone.layers == [4, 11, 17, 23] and vitl.data.chip_size % 14 == 0
    with pytest.raises(DinoscopeError, match="head.type") as err:
        load_recipe(CanopyFitRecipe, TINY_FIT, ["head.type=unet"])
    assert "linear" in str(err.value)
    with pytest.raises(DinoscopeError, match="dpt head needs exactly 4"):
        load_recipe(CanopyFitRecipe, TINY_FIT, ["head.type=dpt"])  # vit_test has 2 layers in this recipe
    fit_kind, predict_kind = canopy_fit_kind(), canopy_predict_kind()
    assert isinstance(fit_kind, RecipeKind) and fit_kind.schema is CanopyFitRecipe
    assert predict_kind.schema is CanopyPredictRecipe
