"""``dinoscope launch`` on SLURM: the rendezvous read from the SLURM environment, requeue on checkpoint, and the job
function run by submitit's local executor."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from core.launch import plan_launch
from core.launch.resources import LaunchResources, load_resources
from core.launch.slurm import TrainingJob, rendezvous_environ, training_job

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
TINY = RECIPES / "tiny" / "pretrain.yaml"
TWO_ITERS = [
    "train.max_iters=2",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "data.params.n=32",
    "train.batch_size_per_rank=8",
    "optim.warmup_epochs=0.01",
    "optim.freeze_last_layer_epochs=0.01",
    "teacher.warmup_teacher_temp_epochs=0.01",
]


def _iterations(run: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ SLURM job function
def test_rendezvous_from_the_slurm_environment() -> None:
    environ = {
        "SLURM_PROCID": "9",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "128",
        "SLURM_NNODES": "16",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[003-018]",
        "SLURM_JOB_ID": "4242",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "stale-host",
    }  # left over from the submitting shell
    assert rendezvous_environ(environ) == {
        "MASTER_ADDR": "gpu003",
        "MASTER_PORT": "24242",
        "RANK": "9",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "128",
        "LOCAL_WORLD_SIZE": "8",
        "GROUP_RANK": "1",
    }
    assert rendezvous_environ(environ, master_port=29400)["MASTER_PORT"] == "29400"
    local = rendezvous_environ(
        {
            "SUBMITIT_LOCAL_GLOBALID": "1",
            "SUBMITIT_LOCAL_LOCALID": "1",
            "SUBMITIT_LOCAL_NTASKS": "2",
            "SUBMITIT_LOCAL_JOB_ID": "777",
        }
    )
    assert (local["RANK"], local["WORLD_SIZE"], local["MASTER_ADDR"], local["MASTER_PORT"]) == (
        "1",
        "2",
        "127.0.0.1",
        "20777",
    )


def test_checkpoint_requeues_the_same_callable(tmp_path: Path) -> None:
    from submitit.helpers import DelayedSubmission

    plan = plan_launch(TINY, TWO_ITERS, LaunchResources(launcher="slurm", time="10"), tmp_path / "run")
    job = training_job(plan)
    delayed = job.checkpoint()
    assert isinstance(delayed, DelayedSubmission)
    assert delayed.function is job and delayed.args == () and delayed.kwargs == {}
    delayed.dump(tmp_path / "requeued.pkl")  # what submitit writes before requeueing
    reloaded = DelayedSubmission.load(tmp_path / "requeued.pkl")
    assert isinstance(reloaded.function, TrainingJob) and reloaded.function == job
    assert Path(job.run_dir).is_absolute() and job.overrides == TWO_ITERS
    no_requeue = training_job(plan_launch(TINY, [], LaunchResources(launcher="slurm", time="10", requeue=False)))
    assert no_requeue.checkpoint() is None


@pytest.mark.parametrize("tasks", [1, pytest.param(2, marks=[pytest.mark.slow, pytest.mark.distributed])])
def test_submitit_local_executor_runs_the_job_function(tmp_path: Path, tasks: int) -> None:
    from core.launch.slurm import submit

    run = tmp_path / "run"
    resources = load_resources(RECIPES / "launch" / "submitit_local_cpu.yaml", [f"nproc_per_node={tasks}"])
    job = submit(plan_launch(TINY, TWO_ITERS, resources, run))
    deadline = time.time() + 120
    while not job.done() and time.time() < deadline:
        time.sleep(0.2)
    if not job.done():
        job.cancel()
        pytest.fail("the submitit job did not finish in 120 s")
    assert job.results() == [0] * tasks, job.stderr()
    last_log = next(Path(job.paths.folder).glob(f"*_{tasks - 1}_log.err")).read_text()
    assert f"rank {tasks - 1}/{tasks}" in last_log or tasks == 1  # the tasks joined one process group
    assert _iterations(run) == [1, 2] and (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    record = json.loads((run / "launch.json").read_text())
    assert record["job_id"] == str(job.job_id) and record["world_size"] == tasks
    assert (run / "config.yaml").exists() and (run / "run_info.json").exists()
