"""End-to-end pretraining through the CLI: run directory, export, kill-and-resume, NaN guard, multi-process ZeRO."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.cli import main
from core.weights import load_backbone

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny" / "pretrain.yaml")
FAST = [
    "train.max_iters=12",
    "train.checkpoint_every=6",
    "train.log_every=1",
    "data.params.n=64",
    "optim.warmup_epochs=0.02",
    "teacher.warmup_teacher_temp_epochs=0.05",
]


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["loss/total"] for r in rows}


def test_tiny_pretrain_writes_run_dir_and_exports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert main(["pretrain", TINY, *FAST, "--output-dir", str(run)]) == 0
    for name in ("config.yaml", "run_info.json", "metrics.jsonl", "loss_curve.png"):
        assert (run / name).exists(), name
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 13)) and all(v == v for v in losses.values())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {
        "loss/dino_local",
        "loss/dino_global",
        "loss/koleo",
        "loss/ibot",
        "lr",
        "teacher_temp",
        "images_per_s",
        "max_memory_mb",
    } <= set(rows[-1])
    out = tmp_path / "export" / "tiny.safetensors"
    assert main(["export", str(run), str(out)]) == 0
    model, meta = load_backbone(out)
    assert meta.source_format == "dinoscope" and meta.patch_size == 8 and meta.extra["recipe"]["model"]["arch"]
    assert sum(p.numel() for p in model.parameters()) > 0


def test_resume_after_sigkill_reproduces_losses(tmp_path: Path) -> None:
    # Every run is a subprocess with the same thread count, so the arithmetic is identical.
    env = {**os.environ, "DINOSCOPE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}

    def command(run: Path) -> list[str]:
        return [sys.executable, "-m", "core.cli", "pretrain", TINY, *FAST, "--output-dir", str(run)]

    reference, run = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(command(reference), cwd=ROOT, env=env, check=True, capture_output=True)
    proc = subprocess.Popen(command(run), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "latest").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _losses(run)
    assert 6 <= max(done) < 12, "the run must be killed between the first checkpoint and the end"
    subprocess.run(command(run), cwd=ROOT, env=env, check=True, capture_output=True)
    resumed, expected = _losses(run), _losses(reference)
    assert [resumed[it] for it in range(1, 13)] == [expected[it] for it in range(1, 13)]


def test_nan_guard_stops_cleanly_naming_the_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["pretrain", TINY, *FAST, "optim.base_lr=1e30", "--output-dir", str(tmp_path / "nan")])
    assert code == 2
    assert "at iteration" in capsys.readouterr().err


def test_recipe_typo_fails_before_running(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["pretrain", TINY, "optim.bse_lr=0.1", "--output-dir", str(tmp_path / "typo")]) == 2
    err = capsys.readouterr().err
    assert "optim.bse_lr" in err and "base_lr" in err
    assert not (tmp_path / "typo").exists()


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_deepspeed_pretrain(tmp_path: Path, stage: int) -> None:
    run = tmp_path / f"zero{stage}"
    env = {**os.environ, "DINOSCOPE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "core.cli",
        "pretrain",
        TINY,
        "train.max_iters=4",
        "train.checkpoint_every=4",
        "train.log_every=1",
        "train.batch_size_per_rank=8",
        "data.params.n=64",
        "optim.warmup_epochs=0.02",
        "teacher.warmup_teacher_temp_epochs=0.02",
        "optim.freeze_last_layer_epochs=0.01",
        "dist.strategy=deepspeed",
        f"dist.zero_stage={stage}",
        "--output-dir",
        str(run),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(_losses(run)) == [1, 2, 3, 4]
    assert main(["export", str(run), str(tmp_path / "z.safetensors")]) == 0
    load_backbone(tmp_path / "z.safetensors")
