"""Checkpoints that survive a requeue: save on SIGTERM/SIGUSR2, resume at another world size, run-dir discipline.

Every training run here is a real ``dinoscope pretrain`` subprocess (torchrun for several ranks), as a scheduler
would start it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.train.preemption import StopRequest, TrainingInterrupted

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny" / "pretrain.yaml")
SHORT = [
    "train.log_every=1",
    "data.params.n=64",
    "optim.warmup_epochs=0.02",
    "teacher.warmup_teacher_temp_epochs=0.02",
    "optim.freeze_last_layer_epochs=0.01",
]
ENV = {**os.environ, "DINOSCOPE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def _pretrain(run: Path, *overrides: str, nproc: int = 1) -> list[str]:
    launcher = (
        [sys.executable, "-m", "core.cli"]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "core.cli",
        ]
    )
    return [*launcher, "pretrain", TINY, *SHORT, *overrides, "--output-dir", str(run)]


def _rows(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    path = run / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


def _wait_for_lines(run: Path, n: int, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.time() + timeout_s
    while len(_rows(run)) < n and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be signalled"
    assert len(_rows(run)) >= n, "the run logged nothing in time"


# ------------------------------------------------------------------------------------------------ pre-emption
def test_sigterm_saves_the_reached_iteration_and_the_resumed_run_repeats_none(tmp_path: Path) -> None:
    long = ["train.max_iters=150", "train.checkpoint_every=1000"]  # no periodic checkpoint before the end
    reference, run = tmp_path / "reference", tmp_path / "stopped"
    subprocess.run(_pretrain(reference, *long), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(
        _pretrain(run, *long), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_lines(run, 4, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM after iteration" in err and "Traceback" not in err
    reached = max(r["iteration"] for r in _rows(run))
    assert 4 <= reached < 150
    assert _latest(run) == f"step_{reached:08d}"  # a checkpoint at the very iteration reached, not an older one
    resumed = subprocess.run(_pretrain(run, *long), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    iterations = [r["iteration"] for r in _rows(run)]
    assert iterations == list(range(1, 151))  # nothing repeated, nothing skipped
    assert [r["loss/total"] for r in _rows(run)] == [r["loss/total"] for r in _rows(reference)]


def test_sigusr2_is_handed_to_the_previous_handler_after_the_save(tmp_path: Path) -> None:
    """Under submitit the earlier USR2 handler requeues the job: it must run, and only after our state is saved."""
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.requested and stop.signum == signal.SIGUSR2 and calls == []  # recorded, nothing else yet
            with pytest.raises(TrainingInterrupted) as stopped:
                stop.finish(7, tmp_path / "step_00000007")
        assert calls == [signal.SIGUSR2]
        assert stopped.value.exit_code == 128 + signal.SIGUSR2 and stopped.value.iteration == 7
        assert signal.getsignal(signal.SIGUSR2) is not stop._record  # our handler is gone again
    finally:
        signal.signal(signal.SIGUSR2, previous)


# ------------------------------------------------------------------------------------------------ resharding
@pytest.mark.distributed
def test_two_rank_zero2_checkpoint_resumes_at_world_sizes_1_and_4(tmp_path: Path) -> None:
    evalset = "{kind: synthetic_shapes, params: {n: 24, size: 32, seed: %d, labelled: true}}"
    common = [
        "train.max_iters=6",
        "train.checkpoint_every=3",
        "train.keep_checkpoints=5",
        "train.batch_size_per_rank=4",
        "dist.strategy=deepspeed",
        "dist.zero_stage=2",
        "eval.every=3",
        f"eval.train={evalset % 1}",
        f"eval.val={evalset % 2}",
        "eval.ks=[3]",
    ]
    two = tmp_path / "two_ranks"
    proc = subprocess.run(
        _pretrain(two, *common, "train.max_iters=3", nproc=2),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["iteration"] for r in _rows(two, "eval_knn.jsonl")] == [3]  # computed and written once, not per rank
    for world, nproc in ((1, 1), (4, 4)):
        run = tmp_path / f"resumed_at_{world}"
        subprocess.run(["cp", "-r", str(two), str(run)], check=True)
        proc = subprocess.run(
            _pretrain(run, *common, nproc=nproc) + ["--allow-recipe-change"],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = _rows(run)
        assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]
        assert all(r["loss/total"] == r["loss/total"] for r in rows)
        assert (run / "checkpoints" / "step_00000003" / "deepspeed" / "state_universal").is_dir()
        assert _latest(run) == "step_00000006"
        changes = [json.loads(line) for line in (run / "recipe_changes.jsonl").read_text().splitlines()]
        assert [c[0] for c in changes[0]["changes"]] == ["train.max_iters"]


@pytest.mark.distributed
def test_resharded_state_equals_the_saved_state(tmp_path: Path) -> None:
    """Parameters and AdamW moments after loading a 2-rank ZeRO-2 checkpoint at world size 1 and 3 are the saved
    ones, element for element (``tests/core/reshard_worker.py`` does the save and the checks)."""
    worker = str(Path(__file__).with_name("reshard_worker.py"))
    out = tmp_path / "ckpt"

    def torchrun(nproc: int, *args: str) -> None:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            worker,
            *args,
        ]
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    torchrun(2, "save", str(out))
    for world in (1, 3):
        torchrun(world, "check", str(out))


# ------------------------------------------------------------------------------------------------ run directory
def test_second_run_on_a_locked_directory_exits_2_at_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = subprocess.Popen(
        _pretrain(run, "train.max_iters=150", "train.checkpoint_every=1000"),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_lines(run, 1, first)
        started = time.monotonic()
        second = subprocess.run(
            _pretrain(run, "train.max_iters=150"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 2
        assert time.monotonic() - started < 30  # no waiting for the lock (the time is interpreter start-up)
        assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 143


def test_changed_recipe_is_refused_on_resume_unless_allowed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = ["train.max_iters=4", "train.checkpoint_every=2"]
    subprocess.run(_pretrain(run, *base), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    config_before = (run / "config.yaml").read_text()
    changed = subprocess.run(
        _pretrain(run, *base, "optim.base_lr=0.01"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert changed.returncode == 2
    assert "optim.base_lr" in changed.stderr and "0.001 -> 0.01" in changed.stderr
    assert "--allow-recipe-change" in changed.stderr and "Traceback" not in changed.stderr
    assert (run / "config.yaml").read_text() == config_before  # a refused resume writes nothing
    operational = subprocess.run(
        _pretrain(run, *base, "train.num_workers=1", "train.max_iters=6") + ["--allow-recipe-change"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert operational.returncode == 0, operational.stderr[-2000:]
    assert [r["iteration"] for r in _rows(run)] == [1, 2, 3, 4, 5, 6]
    recorded = [json.loads(line) for line in (run / "recipe_changes.jsonl").read_text().splitlines()]
    assert recorded[-1]["iteration"] == 4 and [c[0] for c in recorded[-1]["changes"]] == ["train.max_iters"]


def test_resume_drops_lines_after_the_checkpoint_and_cleans_orphans(tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = ["train.max_iters=6", "train.checkpoint_every=3"]
    subprocess.run(
        _pretrain(run, *base, "train.max_iters=3"), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300
    )
    # what a crash between checkpoints leaves behind: lines past the checkpoint, a torn line, temporaries
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"iteration": 4, "loss/total": 1.0}) + "\n" + '{"iteration": 5, "lo')
    orphan_file = run / ".config.yaml.tmp-crashed"
    orphan_dir = run / "checkpoints" / ".step_00000004.tmp-crashed"
    orphan_file.write_text("partial")
    orphan_dir.mkdir()
    proc = subprocess.run(
        _pretrain(run, *base) + ["--allow-recipe-change"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["iteration"] for r in _rows(run)] == [1, 2, 3, 4, 5, 6]
    assert _rows(run)[3]["loss/total"] != 1.0
    assert not orphan_file.exists() and not orphan_dir.exists()
