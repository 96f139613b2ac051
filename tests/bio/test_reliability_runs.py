"""`dinoscope cells embed` keeps its promises about its run directory: a second run on it fails at once naming the
first (and never waits forever), a finished run is left alone, refused or replaced as asked, and SIGTERM stops a
run so that the same command resumes it to the result of an uninterrupted run (fixtures ``screen`` and ``weights``
come from ``conftest.py``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

import bio.embed_store as store_mod
from bio.embed import embed_plate
from core.cli import main
from core.distributed.env import DistEnv
from core.errors import DinoscopeError
from core.models import VisionTransformer
from core.weights import WeightMeta, save_backbone

ROOT = Path(__file__).resolve().parents[2]
# Runs the CLI with every field commit held until the file GATE exists (at most a minute, so nothing hangs).
GATED = """
import sys, time
from pathlib import Path
import bio.embed_store as store
real, gate = store.PartWriter._commit, Path(sys.argv[1])
def gated(self, record):
    real(self, record)
    deadline = time.monotonic() + 60
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
store.PartWriter._commit = gated
from core.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _args(screen: object, weights: Path, out: Path, *extra: str) -> list[str]:
    table = ["--centroids", "table", "--nuclei-table", str(screen.nuclei), "--crop-size", "32", "--batch-size", "4"]
    return ["cells", "embed", *map(str, screen.plates), "--weights", str(weights), "--out", str(out), *table, *extra]


@pytest.fixture(scope="module")
def solo(screen: object, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run with the settings of :func:`_args`."""
    run = tmp_path_factory.mktemp("solo") / "run"
    embed_plate(
        screen.plates, run, weights=weights, crop_size=32, centroids="table", nuclei_table=screen.nuclei, batch_size=4
    )
    return run


def _assert_same_store(run: Path, reference: Path) -> None:
    got = zarr.open_group(run / "embeddings.zarr", mode="r")["embeddings"][:]
    want = zarr.open_group(reference / "embeddings.zarr", mode="r")["embeddings"][:]
    np.testing.assert_array_equal(got, want)
    pd.testing.assert_frame_equal(pd.read_parquet(run / "cells.parquet"), pd.read_parquet(reference / "cells.parquet"))
    assert not (run / "parts").exists()


def _start_gated(argv: list[str], gate: Path, logs: Path) -> subprocess.Popen:
    env = {**os.environ, "DINOSCOPE_NO_PROGRESS": "1"}
    with (logs / "out.txt").open("w") as out, (logs / "err.txt").open("w") as err:
        return subprocess.Popen(
            [sys.executable, "-c", GATED, str(gate), *argv], cwd=ROOT, env=env, stdout=out, stderr=err
        )


def _wait_for_commits(run: Path, proc: subprocess.Popen, logs: Path, n: int = 1) -> None:
    committed = run / "parts" / "rank-0000" / "committed.jsonl"
    deadline = time.monotonic() + 120
    while not (committed.exists() and len(committed.read_text().splitlines()) >= n):
        assert proc.poll() is None, (logs / "err.txt").read_text()[-2000:]
        assert time.monotonic() < deadline, "the first run never committed a field"
        time.sleep(0.05)


def test_a_second_run_on_the_same_directory_fails_at_once_naming_the_first(
    screen: object, weights: Path, solo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run, gate = tmp_path / "run", tmp_path / "gate"
    first = _start_gated(_args(screen, weights, run), gate, tmp_path)
    try:
        _wait_for_commits(run, first, tmp_path)
        started = time.monotonic()
        assert main(_args(screen, weights, run)) == 2
        assert time.monotonic() - started < 10
        err = capsys.readouterr().err
        assert "this embedding run is in use: locked by pid" in err and f"pid {first.pid} on host" in err
        assert "wait for that run to finish" in err
        record = json.loads((run / ".dinoscope.lock").read_text())
        assert record["pid"] == first.pid
        gate.touch()
        assert first.wait(timeout=120) == 0, (tmp_path / "err.txt").read_text()[-2000:]
    finally:
        gate.touch()
        if first.poll() is None:
            first.kill()
            first.wait()
    _assert_same_store(run, solo)
    assert main(_args(screen, weights, run)) == 0  # the lock went with the first run
    assert "already complete" in capsys.readouterr().err


def test_sigterm_stops_the_run_and_the_same_command_resumes_it(
    screen: object, weights: Path, solo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run, gate = tmp_path / "run", tmp_path / "gate"
    first = _start_gated(_args(screen, weights, run), gate, tmp_path)
    try:
        _wait_for_commits(run, first, tmp_path)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 143
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert "stopped by SIGTERM; run the same command to resume" in (tmp_path / "err.txt").read_text()
    kept = store_mod.read_commits(run / "parts" / "rank-0000")
    assert [c["field"] for c in kept] == [0] and not (run / "embeddings.zarr").exists()
    assert main(_args(screen, weights, run)) == 0
    assert f"resuming {run}: 1 of 18 fields were embedded before" in capsys.readouterr().err
    _assert_same_store(run, solo)
    logged = [json.loads(line)["field"] for line in (run / "embed_log.jsonl").read_text().splitlines()]
    assert sorted(logged) == list(range(1, 18))  # field 0 was not embedded again


def test_a_finished_run_is_left_alone_refused_or_replaced(
    screen: object, weights: Path, solo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(solo, run)
    stamp = (run / "embeddings.zarr" / "zarr.json").stat().st_mtime_ns
    assert main(_args(screen, weights, run)) == 0
    assert "already complete with these settings (" in capsys.readouterr().err
    torch.manual_seed(1)
    kwargs = json.loads((weights.with_suffix(".json")).read_text())["model_kwargs"]
    other = save_backbone(
        VisionTransformer(**kwargs),
        WeightMeta("vit_test", kwargs, ["channel"], [0.0], [1.0], extra={"input_normalisation": "per_image_zscore"}),
        tmp_path / "other.safetensors",
    )
    for extra, changed in (
        (["--crop-size", "40"], "(crops)"),
        (["--channels", "DNA,ER"], "(channels, features)"),
        (["--float16"], "(dtype)"),
    ):
        assert main(_args(screen, weights, run, *extra)) == 2
        err = capsys.readouterr().err
        assert f"holds an embedding run made with different settings {changed}" in err
        assert "fix: pass --overwrite to replace it, or choose another --out" in err
    assert main(_args(screen, other, run)) == 2
    assert "different settings (weights)" in capsys.readouterr().err
    assert (run / "embeddings.zarr" / "zarr.json").stat().st_mtime_ns == stamp  # refused runs changed nothing
    _assert_same_store(run, solo)
    assert main(_args(screen, weights, run, "--channels", "DNA,ER", "--overwrite")) == 0
    assert "--overwrite: replacing the run" in capsys.readouterr().err
    attrs = zarr.open_group(run / "embeddings.zarr", mode="r").attrs.asdict()
    assert attrs["channel_names"] == ["DNA", "ER"] and attrs["n_cells"] == len(pd.read_csv(screen.nuclei))
    assert zarr.open_group(run / "embeddings.zarr", mode="r")["embeddings"].shape[1] == 2 * 64
    assert len((run / "embed_log.jsonl").read_text().splitlines()) == 18  # the old run's log went with it


def test_ranks_change_nothing_unless_every_rank_locked_and_agreed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "embed_config.json").write_text(json.dumps({"old": 1}))
    (run / "parts" / "rank-0001").mkdir(parents=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    env = DistEnv.from_environ()
    votes: list[bool] = []
    monkeypatch.setattr(store_mod.RankSync, "agree", lambda self, ok: votes.append(ok) or False)  # rank 0 failed
    lock = store_mod.run_lock(run, env.rank)
    with pytest.raises(DinoscopeError, match="another rank of this job could not start"):
        store_mod.start_run(run, {"new": 1}, env, lock, resume=False, overwrite=False)
    lock.release()
    assert votes == [True] and lock.lock_file == run / ".rank-0001.lock"
    assert (run / "parts" / "rank-0001").exists() and json.loads((run / "embed_config.json").read_text()) == {"old": 1}
    with pytest.raises(DinoscopeError, match="disappeared"):  # one process never waits for fields it committed
        store_mod.wait_for_all(run, 3, poll_seconds=60, world_size=1)
