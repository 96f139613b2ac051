"""`canopy predict` under pressure: a second run on the same output, SIGTERM, a full disk.

Each case runs the real command line on a synthetic forest; the interrupted or blocked run is then finished (or
rerun) and its COG must equal an uninterrupted run's, pixel for pixel.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.errors import RasterioIOError

from core.cli import main
from geodino import cog, predict
from geodino.model import backbone_head_model, random_backbone, save_canopy_model
from geodino.normalise import BandNormaliser
from geodino.synthetic import make_forest

REPO = Path(__file__).parents[2]
# Runs `dinoscope ARGV` in a child process whose model calls after the first FREE ones wait until GATE exists: the
# child is then reliably mid-prediction (first strip on disk) for as long as the test needs.
GATED = """
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
import geodino.predict as predict
gate, free = Path(sys.argv[1]), int(sys.argv[2])
run_model, calls = predict._run_model, [0]
def gated(*args, **kwargs):
    calls[0] += 1
    while calls[0] > free and not gate.exists():
        time.sleep(0.02)
    return run_model(*args, **kwargs)
predict._run_model = gated
from core.cli import main
sys.exit(main(sys.argv[3:]))
"""
# Holds the lock on ARGV[1] (a directory) until stdin closes.
HOLDER = """
import sys
from core.lock import OutputLock
with OutputLock(sys.argv[1], what="prediction directory", is_dir=True):
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the child runs one thread too: identical arithmetic, identical pixels
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("interrupts")
    torch.manual_seed(0)
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
    rgb, _ = make_forest(root / "forest", size=192, seed=3)
    other, _ = make_forest(root / "forest", size=64, seed=4)
    solo = root / "solo.tif"
    paths = {"model": save_canopy_model(model, root / "model.safetensors"), "rgb": rgb, "other": other, "solo": solo}
    assert main(argv(paths, solo)) == 0  # the uninterrupted reference
    return paths


def argv(setup: dict[str, Path], out: Path) -> list[str]:
    # 192 px with 64 px tiles at stride 48: 4 tile rows of one batch each
    return ["canopy", "predict", "--model", str(setup["model"]), str(setup["rgb"]), "--out", str(out)] + [
        "--tile",
        "64",
        "--overlap",
        "16",
    ]


def start_gated(gate: Path, args: list[str]) -> subprocess.Popen:
    env = os.environ | {"DINOSCOPE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", GATED, str(gate), "1", *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the first run ended early ({process.returncode}): {process.communicate()[1]}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def pixels(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def test_a_second_predict_on_the_same_output_exits_2_at_once_and_the_first_finishes_intact(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "chm.tif"
    first = start_gated(tmp_path / "go", argv(setup, out))
    try:
        wait_for(tmp_path / ".chm.tif.partial.json", first)  # the first strip is on disk; the next one waits
        partial = sorted(p.name for p in tmp_path.glob(".chm.tif.partial*"))
        started = time.monotonic()
        assert main(argv(setup, out)) == 2
        assert time.monotonic() - started < 10
        err = capsys.readouterr().err
        assert "chm.tif" in err and "is in use" in err and f"pid {first.pid}" in err and "fix:" in err
        assert sorted(p.name for p in tmp_path.glob(".chm.tif.partial*")) == partial, "the first run's files stay"
        assert not out.exists()
        (tmp_path / "go").touch()
        assert first.wait(60) == 0, first.communicate()[1]
    finally:
        stop(first)
    np.testing.assert_array_equal(pixels(out), pixels(setup["solo"]))
    assert not list(tmp_path.glob(".chm.tif.partial*"))


def test_a_prediction_directory_is_locked_for_the_whole_run(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out_dir = tmp_path / "chm"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out_dir)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        args = argv(setup, out_dir)
        assert main([*args[:4], str(setup["other"]), *args[4:]]) == 2  # two inputs: --out is a directory
        err = capsys.readouterr().err
        assert "is in use" in err and f"pid {holder.pid}" in err
    finally:
        holder.communicate("")
    assert [p.name for p in out_dir.iterdir()] == [".dinoscope.lock"], "nothing was written into the directory"


def test_sigterm_exits_143_keeps_the_partial_state_and_the_rerun_resumes_to_the_same_cog(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "chm.tif"
    first = start_gated(tmp_path / "never", argv(setup, out))
    try:
        wait_for(tmp_path / ".chm.tif.partial.json", first)
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 143
        assert "stopped by SIGTERM" in first.communicate()[1]
    finally:
        stop(first)
    assert not out.exists(), "no complete-looking output after an interruption"
    assert json.loads((tmp_path / ".chm.tif.partial.json").read_text())["next_row"] == 1
    assert (tmp_path / ".chm.tif.partial.tif").exists()
    assert main(argv(setup, out)) == 0
    assert "resuming at tile row 1" in capsys.readouterr().err
    np.testing.assert_array_equal(pixels(out), pixels(setup["solo"]))


def test_a_full_disk_is_one_clear_message_and_the_same_command_then_completes(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "chm.tif"
    write_rows, calls = cog.write_rows, []

    def full_disk(path: Path, row: int, data: np.ndarray) -> None:
        calls.append(row)
        if len(calls) > 1:  # the first strip fits, the second finds the disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write_rows(path, row, data)

    monkeypatch.setattr(cog, "write_rows", full_disk)
    monkeypatch.setattr(predict, "COMMIT_BYTES", 1)  # every tile row is stored on its own, as on a large raster
    assert main(argv(setup, out)) == 2
    err = capsys.readouterr().err
    assert "no space left" in err and str(tmp_path) in err and "chm.tif" in err and "fix:" in err
    assert "Traceback" not in err and err.count("error:") == 1
    assert not out.exists()
    monkeypatch.setattr(cog, "write_rows", write_rows)  # space freed
    assert main(argv(setup, out)) == 0
    assert "resuming at tile row 1" in capsys.readouterr().err
    np.testing.assert_array_equal(pixels(out), pixels(setup["solo"]))


def test_gdal_write_errors_from_a_full_disk_become_enospc_naming_the_file(tmp_path: Path) -> None:
    target = tmp_path / "x.tif"
    with pytest.raises(OSError) as err, cog.disk_errors(target):
        raise RasterioIOError("Write error: ... No space left on device")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    with pytest.raises(OSError) as err, cog.disk_errors(target):  # a Python write that does not name its file
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert err.value.errno == errno.EDQUOT and err.value.filename == str(target)
    with pytest.raises(RasterioIOError), cog.disk_errors(target):  # other errors pass through unchanged
        raise RasterioIOError("TIFFReadDirectory: corrupt")
