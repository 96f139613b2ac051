"""Inputs as they come: a model records the dtype and value range it was trained on; fit, predict and inspect
compare every input with that record and convert it only by a rule the user chose (or stored with the model)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
import torch

from core.cli import main
from core.errors import DinoscopeError
from geodino.model import backbone_head_model, random_backbone, save_canopy_model
from geodino.normalise import BandNormaliser
from geodino.outputs import read_record
from geodino.raster import RasterSource
from geodino.synthetic import make_forest
from geodino.values import InputRecord, InputRule, parse_range, user_rule

TINY_FIT = Path(__file__).parents[2] / "recipes" / "tiny" / "canopy_fit.yaml"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def uint16_cog_with_internal_mask(
    rgb: Path, out: Path, hole: slice = slice(0, 20), dtype: str = "uint16"
) -> tuple[Path, np.ndarray]:
    """``rgb`` x 257 as a uint16 COG (or as it is with ``dtype="uint8"``) without a nodata value, whose internal
    mask hides rows ``hole`` and the pixels the uint8 file marks nodata; returns the path and the mask (True =
    valid)."""
    factor = 257 if dtype == "uint16" else 1
    with rasterio.open(rgb) as src:
        data = src.read().astype(dtype) * factor
        mask = src.dataset_mask() > 0
        profile = dict(src.profile, dtype=dtype, nodata=None, tiled=True, blockxsize=64, blockysize=64)
    mask[hole] = False
    plain = out.with_name("plain16.tif")
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(plain, "w", **profile) as dst:
            dst.write(data)
            dst.write_mask(mask.astype(np.uint8) * 255)
        rasterio.shutil.copy(plain, out, driver="COG")
    plain.unlink()
    return out, mask


def predict(model: Path, image: Path, out: Path, *extra: str) -> int:
    args = ["canopy", "predict", "--model", str(model), str(image), "--out", str(out), "--tile", "64"]
    return main([*args, "--overlap", "16", *extra])


def heights(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def test_a_uint8_model_given_a_uint16_cog_with_an_internal_mask_converts_by_the_chosen_rule_or_exits_2(
    uint8_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    record = json.loads(uint8_model.with_suffix(".json").read_text())["metadata"]["input"]
    assert record["dtype"] == "uint8" and record["range"] == [0.0, 255.0] and record["rule"] is None
    rgb, _ = make_forest(tmp_path / "forest", size=128, seed=11)
    cog, mask = uint16_cog_with_internal_mask(rgb, tmp_path / "scene16.tif")
    with RasterSource(cog) as src:
        assert src.dtype == "uint16" and src.nodata is None and src.mask_kind == "per-dataset mask"

    assert predict(uint8_model, cog, tmp_path / "refused.tif") == 2
    err = capsys.readouterr().err
    assert "scene16.tif" in err and "uint16" in err and "uint8" in err and "--input-range" in err
    assert "Traceback" not in err and not (tmp_path / "refused.tif").exists(), "never predicted silently"

    same8, _ = uint16_cog_with_internal_mask(rgb, tmp_path / "scene8.tif", dtype="uint8")  # same mask, uint8
    assert predict(uint8_model, same8, tmp_path / "from_uint8.tif") == 0
    assert predict(uint8_model, cog, tmp_path / "ranged.tif", "--input-range", "0,65535") == 0
    assert predict(uint8_model, cog, tmp_path / "scaled.tif", "--input-scale", str(255 / 65535)) == 0
    reference = heights(tmp_path / "from_uint8.tif")
    for name in ("ranged.tif", "scaled.tif"):
        converted = heights(tmp_path / name)
        np.testing.assert_array_equal(np.isfinite(converted), mask)  # the internal mask is the nodata
        np.testing.assert_allclose(converted[mask], reference[mask], atol=1e-3)  # 257 x v back to v
    rule = read_record(tmp_path / "ranged.tif")["input_rule"]
    assert rule["kind"] == "range" and rule["high"] == [65535.0] and rule["to"] == [0.0, 255.0]


def test_fit_refuses_a_dtype_its_normalisation_does_not_fit_and_stores_a_chosen_rule(
    tmp_path: Path, uint8_model: Path, capsys: pytest.CaptureFixture
) -> None:
    rgb, chm = make_forest(tmp_path / "forest", size=128, seed=12)
    cog, _ = uint16_cog_with_internal_mask(rgb, tmp_path / "train16.tif", hole=slice(0, 0))
    base = ["canopy", "fit", str(TINY_FIT), f"data.pairs=[[{cog},{chm}]]", "data.synthetic.scenes=0"]
    quick = ["optim.epochs=1", "data.val_fraction=0.5", "train.progress=false", "data.normalise=weights_meta"]
    assert main([*base, *quick, "--output-dir", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "data.dtype_max" in err and "uint16" in err and "data.input_range" in err
    assert not (tmp_path / "refused").exists(), "refused before anything is written"

    run = tmp_path / "run16"
    assert main([*base, *quick, "data.input_range=0,65535", "--output-dir", str(run)]) == 0
    record = InputRecord.from_dict(json.loads((run / "model.json").read_text())["metadata"]["input"])
    assert record.dtype == "uint16" and record.range == (0.0, 255.0) and record.rule.high == (65535.0,)
    assert max(high for _, high in record.observed) <= 255.0

    other, _ = make_forest(tmp_path / "other", size=96, seed=13)
    other16, mask = uint16_cog_with_internal_mask(other, tmp_path / "other16.tif")
    capsys.readouterr()
    with pytest.raises(DinoscopeError, match="uint8"):  # a uint8 input does not match a uint16 model
        main(
            [
                "-v",
                "canopy",
                "predict",
                "--model",
                str(run / "model.safetensors"),
                str(other),
                "--out",
                str(tmp_path / "x.tif"),
            ]
        )
    assert predict(run / "model.safetensors", other16, tmp_path / "auto.tif") == 0  # the stored rule converts it
    assert read_record(tmp_path / "auto.tif")["input_rule"]["origin"] == "--input-range 0,65535"
    assert np.array_equal(np.isfinite(heights(tmp_path / "auto.tif")), mask)


def float_model(path: Path, record: InputRecord | None) -> Path:
    torch.manual_seed(0)
    backbone, meta = random_backbone("vit_test", 8, 32)
    metadata = {"gsd_m": 0.5} | ({"input": record.to_dict()} if record else {})
    model = backbone_head_model(
        backbone,
        meta,
        "linear",
        {"embed_dim": 64, "n_layers": 1, "n_bins": 16, "max_height": 40.0},
        layers=[1],
        feature_norm=False,
        normaliser=BandNormaliser([0.1] * 3, [0.05] * 3),
        band_names=["red", "green", "blue"],
        metadata=metadata,
    )
    return save_canopy_model(model, path)


def write_float_rgb(path: Path, values: np.ndarray) -> Path:
    profile = {
        "driver": "GTiff",
        "width": values.shape[2],
        "height": values.shape[1],
        "count": 3,
        "dtype": "float32",
        "crs": "EPSG:32617",
        "transform": rasterio.Affine(0.5, 0, 5e5, 0, -0.5, 4e6),
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(values.astype(np.float32))
    return path


def test_same_dtype_far_outside_the_trained_range_is_refused_and_a_model_without_record_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    model = float_model(tmp_path / "reflectance.safetensors", InputRecord("float32", (0.0, 0.6)))
    rng = np.random.default_rng(0)
    reflectance = write_float_rgb(tmp_path / "refl.tif", rng.uniform(0.0, 0.5, (3, 48, 48)))
    scaled = write_float_rgb(tmp_path / "x10000.tif", rng.uniform(0.0, 5000, (3, 48, 48)))
    assert predict(model, reflectance, tmp_path / "ok.tif") == 0
    assert predict(model, scaled, tmp_path / "no.tif") == 2
    err = capsys.readouterr().err
    assert "far outside the trained 0..0.6" in err and "--input-scale" in err
    assert predict(model, scaled, tmp_path / "yes.tif", "--input-scale", "0.0001") == 0

    legacy = float_model(tmp_path / "legacy.safetensors", None)
    with caplog.at_level(logging.WARNING):
        assert predict(legacy, scaled, tmp_path / "legacy.tif") == 0
    assert "no record of the inputs it was trained on" in caplog.text and "float32" in caplog.text


def test_canopy_inspect_shows_bands_mask_crs_gsd_and_how_the_model_would_take_it(
    uint8_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rgb, _ = make_forest(tmp_path / "forest", size=96, seed=14)
    cog, _ = uint16_cog_with_internal_mask(rgb, tmp_path / "scene16.tif")
    assert main(["canopy", "inspect", str(cog), "--model", str(uint8_model)]) == 0
    text = capsys.readouterr().out
    for words in (
        "uint16",
        "per-dataset mask",
        "EPSG:32617 (projected, metre)",
        "pixel size  0.5 x 0.5 m",
        "nodata None",
        "inputs of uint8, values 0..255",
        "would refuse",
        "--input-range",
    ):
        assert words in text, (words, text)
    assert main(["canopy", "inspect", str(cog), "--model", str(uint8_model), "--input-range", "auto", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mask"] == "per-dataset mask" and 0.7 < report["valid_fraction"] < 0.85
    assert [b["dtype"] for b in report["bands"]] == ["uint16"] * 3 and report["pixel_size_m"] == [0.5, 0.5]
    assert report["model"]["verdict"] == "canopy predict would accept this raster"
    assert any("converted by raw" in check and "auto: p2..p98" in check for check in report["model"]["checks"])

    assert main(["canopy", "inspect", str(rgb)]) == 0  # no model: the raster alone
    text = capsys.readouterr().out
    assert "nodata value 255 (in every band)" in text and "model" not in text


def test_input_rules_map_clip_and_round_trip() -> None:
    data = np.array([[[0.0, 5000.0, 20000.0]], [[100.0, 200.0, 300.0]]], np.float32)
    rule = InputRule("range", (0.0, 100.0), (10000.0, 300.0), (0.0, 255.0))
    np.testing.assert_allclose(rule.apply(data), [[[0, 127.5, 255]], [[0, 127.5, 255]]])  # per band, clipped
    np.testing.assert_allclose(InputRule("scale", scale=0.5).apply(data)[1], [[50, 100, 150]])
    assert InputRule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule
    assert parse_range("0, 10000") == (0.0, 10000.0) and parse_range("AUTO") == "auto" and parse_range("") is None
    for bad in ("5,1", "bright", "1,2,3"):
        with pytest.raises(DinoscopeError, match="input"):
            parse_range(bad)
    with pytest.raises(DinoscopeError, match="not both"):
        user_rule("0,1", 2.0, (0.0, 255.0))
    auto = user_rule("auto", 0.0, (0.0, 255.0), lambda: ([1.0, 2.0], [3.0, 4.0]))
    assert auto.low == (1.0, 2.0) and auto.high == (3.0, 4.0) and auto.origin.startswith("auto")
