"""Two ``dinoscope pretrain`` runs on one run directory: the second exits 2 at once naming the first, and the first
run's result equals a solo run's (nothing interleaved into its metrics or checkpoints)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny" / "pretrain.yaml"
SHORT = [
    "train.max_iters=96",
    "optim.epoch_length=48",
    "optim.warmup_epochs=0.5",
    "teacher.warmup_teacher_temp_epochs=0.5",
    "optim.freeze_last_layer_epochs=0.5",
    "train.checkpoint_every=48",
    "train.log_every=1",
    "eval.every=0",
    "train.num_workers=0",
]


def _pretrain(run: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DINOSCOPE_NO_PROGRESS": "1"}
    env.pop("DINOSCOPE_NO_LOCK", None)
    argv = [sys.executable, "-m", "core.cli", "pretrain", str(TINY), "--output-dir", str(run), *SHORT]
    return subprocess.Popen(argv, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["iteration"], r["loss/total"]) for r in rows if "loss/total" in r]


@pytest.mark.distributed
def test_a_second_pretrain_on_the_same_run_directory_exits_2_at_once(tmp_path: Path) -> None:
    solo = _pretrain(tmp_path / "solo")
    assert solo.wait(timeout=300) == 0, solo.stderr.read()
    run = tmp_path / "shared"
    first = _pretrain(run)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists():  # the first run holds the lock once it logs
        assert first.poll() is None, first.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    second = _pretrain(run)
    _, err = second.communicate(timeout=120)
    still_running = first.poll() is None
    assert second.returncode == 2, err
    assert "locked" in err and str(first.pid) in err, err
    assert "Traceback" not in err
    assert still_running, "the second run must fail while the first is running, not wait for it"
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert _losses(run) == _losses(tmp_path / "solo") and len(_losses(run)) == 96
