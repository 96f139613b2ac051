"""The SSL engine pretrains on GeoTIFF windows through a recipe (`data.kind: geotiff`), and the export loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.cli import main
from core.weights import load_backbone

RECIPE = str(Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "geo_pretrain.yaml")


def test_pretrain_on_geotiff_windows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    forests = tmp_path / "forests"
    assert main(["canopy", "synth", str(forests), "--scenes", "2", "--size", "128"]) == 0
    assert len(list(forests.glob("*_rgb.tif"))) == 2
    run = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                RECIPE,
                f"data.params.paths={forests}/*_rgb.tif",
                "data.params.length=64",
                "train.max_iters=4",
                "train.checkpoint_every=4",
                "train.log_every=1",
                "optim.warmup_epochs=0.01",
                "teacher.warmup_teacher_temp_epochs=0.01",
                "optim.freeze_last_layer_epochs=0.01",
                "--output-dir",
                str(run),
            ]
        )
        == 0
    )
    assert (run / "metrics.jsonl").read_text().count("\n") == 4
    assert main(["export", str(run), str(tmp_path / "geo.safetensors")]) == 0
    _, meta = load_backbone(tmp_path / "geo.safetensors")
    assert meta.in_chans == 3 and meta.patch_size == 8


def test_geotiff_recipe_with_unknown_key_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["pretrain", RECIPE, "data.params.window=64", "--output-dir", str(tmp_path / "x")])
    assert code == 2 and "window_size" in capsys.readouterr().err
