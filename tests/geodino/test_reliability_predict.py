"""`canopy predict` keeps its promise about existing outputs and impossible requests.

An output made the same way is skipped with a message; one made with another model or other settings is refused
(never silently skipped, never silently replaced) unless --overwrite; a request that could only produce nodata, a
CUDA device that is not there, or an output path that cannot be written exits 2 with one message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from core.cli import main
from geodino.model import backbone_head_model, random_backbone, save_canopy_model
from geodino.normalise import BandNormaliser
from geodino.outputs import RECORD_TAG
from geodino.synthetic import make_forest


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("predict-outputs")
    paths = {f"model{seed}": tiny_model(root / f"model{seed}.safetensors", seed) for seed in (1, 2)}
    for seed in (3, 4):
        paths[f"rgb{seed}"], _ = make_forest(root / "forest", size=96, seed=seed)
    yield paths
    torch.set_num_threads(before)


def tiny_model(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    backbone, meta = random_backbone("vit_test", 8, 32)
    model = backbone_head_model(
        backbone,
        meta,
        "linear",
        {"embed_dim": 64, "n_layers": 1, "n_bins": 16, "max_height": 40.0},
        layers=[1],
        feature_norm=False,
        normaliser=BandNormaliser([100.0] * 3, [50.0] * 3),
        band_names=["red", "green", "blue"],
        metadata={"gsd_m": 0.5},
    )
    return save_canopy_model(model, path)


def predict(model: Path, inputs: list[Path], out: Path, *extra: str) -> int:
    args = ["canopy", "predict", "--model", str(model), *map(str, inputs), "--out", str(out)]
    return main([*args, "--tile", "64", "--overlap", "16", *extra])


def pixels(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def record(path: Path) -> dict:
    with rasterio.open(path) as ds:
        return json.loads(ds.tags()[RECORD_TAG])


def test_an_existing_cog_is_skipped_when_made_the_same_way_and_refused_otherwise_unless_overwrite(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, rgb, m1, m2 = tmp_path / "chm.tif", setup["rgb3"], setup["model1"], setup["model2"]
    assert predict(m1, [rgb], out) == 0
    made = record(out)
    assert made["model"]["name"] == "model1.safetensors" and made["tile"] == 64 and made["bands"] == [1, 2, 3]
    first, stamp = pixels(out), out.stat().st_mtime_ns
    capsys.readouterr()

    assert predict(m1, [rgb], out) == 0
    assert "chm.tif is already complete (same model, settings and input): skipped" in capsys.readouterr().err
    assert out.stat().st_mtime_ns == stamp

    assert predict(m2, [rgb], out) == 2
    err = capsys.readouterr().err
    assert "chm.tif" in err and "made differently" in err and "another model (model1.safetensors, now model2" in err
    assert "--overwrite" in err and out.stat().st_mtime_ns == stamp

    assert predict(m1, [rgb], out, "--tile", "96") == 2
    assert "tile was 64, now 96" in capsys.readouterr().err
    assert predict(m1, [rgb], out, "--dtype", "uint16") == 2
    assert "out_dtype was 'float32', now 'uint16'" in capsys.readouterr().err
    assert predict(m1, [rgb], out, "--batch-size", "2", "--workers", "2") == 0, "speed settings change no pixel"
    assert "skipped" in capsys.readouterr().err and out.stat().st_mtime_ns == stamp

    assert predict(m2, [rgb], out, "--overwrite") == 0
    assert record(out)["model"]["name"] == "model2.safetensors"
    assert not np.array_equal(pixels(out), first, equal_nan=True)


def test_a_file_not_written_by_predict_is_never_taken_for_a_finished_prediction(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "chm.tif"
    out.write_bytes(setup["rgb3"].read_bytes())  # e.g. an earlier export under the same name
    assert predict(setup["model1"], [setup["rgb3"]], out) == 2
    assert "no record of how it was made" in capsys.readouterr().err
    assert out.read_bytes() == setup["rgb3"].read_bytes()
    assert predict(setup["model1"], [setup["rgb3"]], out, "--overwrite") == 0
    assert record(out)["input"]["name"] == setup["rgb3"].name


def test_an_input_changed_since_its_prediction_is_refused_unless_overwrite(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    scene, out = tmp_path / "scene.tif", tmp_path / "chm.tif"
    scene.write_bytes(setup["rgb3"].read_bytes())
    assert predict(setup["model1"], [scene], out) == 0
    scene.write_bytes(setup["rgb4"].read_bytes())  # new imagery under the same name
    assert predict(setup["model1"], [scene], out) == 2
    assert "the input file scene.tif has changed since it was made" in capsys.readouterr().err
    assert predict(setup["model1"], [scene], out, "--overwrite") == 0
    assert predict(setup["model1"], [setup["rgb4"]], tmp_path / "solo.tif") == 0
    np.testing.assert_array_equal(pixels(out), pixels(tmp_path / "solo.tif"))


def test_a_directory_of_cogs_from_another_model_is_refused_not_skipped(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, inputs = tmp_path / "chm", [setup["rgb3"], setup["rgb4"]]
    assert predict(setup["model1"], inputs, out) == 0
    cogs = [out / f"{p.stem}.tif" for p in inputs]
    stamps = [p.stat().st_mtime_ns for p in cogs]
    assert predict(setup["model2"], inputs, out) == 2
    err = capsys.readouterr().err
    assert cogs[0].name in err and "another model" in err and "and 1 more output" in err and "--overwrite" in err
    assert [p.stat().st_mtime_ns for p in cogs] == stamps

    assert predict(setup["model1"], inputs, out) == 0
    assert capsys.readouterr().err.count("already complete") == 2
    cogs[1].unlink()
    assert predict(setup["model1"], inputs, out) == 0  # only the missing one is predicted
    assert cogs[0].stat().st_mtime_ns == stamps[0] and cogs[1].exists()

    assert predict(setup["model2"], inputs, out, "--overwrite") == 0
    assert [record(p)["model"]["name"] for p in cogs] == ["model2.safetensors"] * 2
    assert (out / "mosaic.vrt").exists()


def test_a_partial_file_of_another_model_is_never_resumed(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import geodino.predict as predict_module

    run_model, calls = predict_module._run_model, []

    def crash_on_second_strip(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_model(*args, **kwargs)

    out = tmp_path / "chm.tif"
    monkeypatch.setattr(predict_module, "_run_model", crash_on_second_strip)
    assert predict(setup["model1"], [setup["rgb3"]], out) == 130
    assert (tmp_path / ".chm.tif.partial.json").exists()
    monkeypatch.setattr(predict_module, "_run_model", run_model)
    assert predict(setup["model2"], [setup["rgb3"]], out) == 0
    assert predict(setup["model2"], [setup["rgb3"]], tmp_path / "solo.tif") == 0
    np.testing.assert_array_equal(pixels(out), pixels(tmp_path / "solo.tif"))


def test_inputs_without_a_valid_pixel_exit_2_and_say_why(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    empty = tmp_path / "empty.tif"
    with rasterio.open(setup["rgb3"]) as src:
        profile = src.profile
    with rasterio.open(empty, "w", **profile) as dst:
        dst.write(np.full((3, profile["height"], profile["width"]), profile["nodata"], profile["dtype"]))
    assert predict(setup["model1"], [empty], tmp_path / "chm.tif") == 2
    err = capsys.readouterr().err
    assert "empty.tif" in err and "every pixel of the input is nodata" in err and "no height at all" in err
    empty.with_name("again.tif").write_bytes(empty.read_bytes())
    assert predict(setup["model1"], [empty, empty.with_name("again.tif")], tmp_path / "d") == 2
    assert "every pixel of every input is nodata" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.tif", "empty.tif"], "nothing was written"

    assert predict(setup["model1"], [empty, setup["rgb3"]], tmp_path / "some") == 0  # one empty tile of many
    assert "empty.tif has no valid pixel: its output will be all nodata" in capsys.readouterr().err
    assert np.isnan(pixels(tmp_path / "some" / "empty.tif")).all()


def test_cuda_without_cuda_exits_2_with_the_fix(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert predict(setup["model1"], [setup["rgb3"]], tmp_path / "chm.tif", "--device", "cuda") == 2
    err = capsys.readouterr().err
    assert "CUDA" in err and "[device]" in err and "fix:" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_output_paths_that_cannot_be_written_exit_2_before_any_work(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "dir.tif").mkdir()
    (tmp_path / "file").write_text("x")
    m1, one, two = setup["model1"], [setup["rgb3"]], [setup["rgb3"], setup["rgb4"]]
    cases = [
        (one, tmp_path / "dir.tif", "is an existing directory, but a file is needed here"),
        (two, tmp_path / "file", "is an existing file, but a directory is needed here"),
        (one, tmp_path / "file" / "chm.tif", "file is a file, not a directory"),
    ]
    for inputs, out, words in cases:
        assert predict(m1, inputs, out) == 2
        err = capsys.readouterr().err
        assert words in err and str(out) in err and "fix:" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.tif", "file"] and not list(
        (tmp_path / "dir.tif").iterdir()
    )
