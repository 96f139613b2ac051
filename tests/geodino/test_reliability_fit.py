"""`canopy fit` writes nothing until its inputs are checked, locks its run directory, and never replaces a finished
fit of another recipe unless told to (--overwrite)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from core.cli import main
from geodino.synthetic import make_forest

REPO = Path(__file__).parents[2]
TINY_FIT = REPO / "recipes" / "tiny" / "canopy_fit.yaml"
QUICK = ["optim.epochs=1", "data.synthetic.scenes=1", "data.synthetic.size=192", "train.progress=false"]
HOLDER = """
import sys
from core.lock import OutputLock
with OutputLock(sys.argv[1], what="run directory", is_dir=True):
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fit(run: Path, *extra: str) -> int:
    return main(["canopy", "fit", str(TINY_FIT), "--output-dir", str(run), *QUICK, *extra])


def test_bad_inputs_fail_before_the_run_directory_exists(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rgb, chm = make_forest(tmp_path / "forest", size=64, seed=0)
    run = tmp_path / "run"
    cases = [
        ([f"data.pairs=[[{tmp_path}/nope.tif,{chm}]]"], ["nope.tif", "file not found"]),
        ([f"data.pairs=[[{rgb},{rgb}]]"], [rgb.name, "has 3 bands; a CHM has one", "fix:"]),
        ([f"data.pairs=[[{rgb},{chm}]]", "data.bands=[1,2]"], ["takes 3 channels but 2 bands", "data.bands"]),
        ([f"backbone.weights={tmp_path}/vit.safetensors"], ["vit.safetensors"]),
        (["train.device=cuda:7"], ["cuda"]),
    ]
    for overrides, words in cases:
        if overrides == ["train.device=cuda:7"] and torch.cuda.device_count() > 7:
            continue
        assert fit(run, *overrides) == 2, overrides
        err = capsys.readouterr().err
        assert all(w in err for w in words), (words, err)
        assert "Traceback" not in err and not run.exists(), "nothing may be written before the checks pass"
    (tmp_path / "afile").write_text("x")
    assert fit(tmp_path / "afile") == 2
    assert "is an existing file, but a directory is needed here" in capsys.readouterr().err


def test_a_finished_fit_of_another_recipe_is_refused_unless_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    assert fit(run) == 0
    model, stamp = run / "model.safetensors", (run / "model.safetensors").stat().st_mtime_ns
    info = (run / "run_info.json").read_text()
    capsys.readouterr()

    assert fit(run, "optim.epochs=2", "optim.lr=0.02") == 2
    err = capsys.readouterr().err
    assert str(run) in err and "finished fit made with a different recipe" in err
    assert "optim.epochs: 1 -> 2" in err and "optim.lr: 0.01 -> 0.02" in err and "--overwrite" in err
    assert model.stat().st_mtime_ns == stamp and (run / "run_info.json").read_text() == info
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["epochs"] == 1

    assert fit(run, "optim.epochs=2", "--overwrite") == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["epochs"] == 2
    assert model.stat().st_mtime_ns != stamp
    # the same recipe (run switches aside) fits again: a head fit never resumes, the feature cache makes it quick
    assert fit(run, "optim.epochs=2", "train.num_workers=1") == 0


def test_the_run_directory_is_locked_while_a_fit_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert fit(run) == 2
        err = capsys.readouterr().err
        assert "run directory is in use" in err and f"pid {holder.pid}" in err and "fix:" in err
    finally:
        holder.communicate("")
    assert [p.name for p in run.iterdir()] == [".dinoscope.lock"], "the second fit wrote nothing"
