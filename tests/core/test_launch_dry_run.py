"""``dinoscope launch --dry-run``: the SLURM job, local processes and multi-node torchrun commands it would start,
and the validation of multi-node flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.cli import main

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
TINY = RECIPES / "tiny" / "pretrain.yaml"
VITG = RECIPES / "cluster" / "pretrain_vitg14_16nodes.yaml"
VITG_RESOURCES = RECIPES / "launch" / "slurm_16nodes_8gpus.yaml"


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------------------------------ dry runs
def test_dry_run_of_vitg_on_16_nodes_prints_the_job(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert (
        main(
            [
                "launch",
                str(VITG),
                f"data.params.paths={tmp_path}",
                "--resources",
                str(VITG_RESOURCES),
                "--partition",
                "big",
                "--account",
                "geo",
                "--time",
                "2-00:00:00",
                "--output-dir",
                str(run),
                "--dry-run",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for line in (
        "#SBATCH --nodes=16",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=big",
        "#SBATCH --account=geo",
        "#SBATCH --time=2880",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@300",
        "#SBATCH --exclusive",
        "#SBATCH --cpus-per-task=12",
        "export NCCL_ASYNC_ERROR_HANDLING=1",
        "-m submitit.core._submit",
        "MASTER_ADDR=<first host of $SLURM_JOB_NODELIST>",
        "MASTER_PORT=20000 + $SLURM_JOB_ID % 20000",
        "RANK=$SLURM_PROCID",
        "LOCAL_RANK=$SLURM_LOCALID",
        "WORLD_SIZE=$SLURM_NTASKS  # 128",
        "128 = 16 nodes x 8 tasks per node",
        "12 per rank x 128 ranks = 1536 global",
    ):
        assert line in out, line
    params = json.loads(out.split("update_parameters(**):\n", 1)[1].split("\n\n", 1)[0])
    assert params["nodes"] == 16 and params["tasks_per_node"] == 8 and params["gpus_per_node"] == 8
    assert params["slurm_partition"] == "big" and params["slurm_account"] == "geo" and params["timeout_min"] == 2880
    command = out.split("equivalent to:\n", 1)[1].splitlines()[0]
    assert f"-m core.cli launch {VITG}" in command and f"data.params.paths={tmp_path}" in command
    assert f"--worker --output-dir {run}" in command
    assert "WARNING" not in out and not run.exists()


def test_dry_run_of_local_processes_prints_the_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        main(
            [
                "launch",
                str(TINY),
                "dist.strategy=deepspeed",
                "--resources",
                str(RECIPES / "launch" / "local_cpu_2proc.yaml"),
                "--output-dir",
                str(tmp_path / "run"),
                "--dry-run",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "-m torch.distributed.run --standalone --nproc_per_node=2 -m core.cli launch" in out
    assert "DS_ACCELERATOR=cpu" in out and "OMP_NUM_THREADS=1" in out and "world size 2" in out
    assert "dist.strategy=deepspeed --worker" in out and not (tmp_path / "run").exists()


MULTI_NODE = ["--launcher", "torchrun", "--nodes", "2", "--nproc", "8", "--master-port", "29400", "--dry-run"]


@pytest.mark.parametrize("backend", ["static", "c10d"])
def test_dry_run_of_torchrun_on_two_nodes(tmp_path: Path, capsys: pytest.CaptureFixture, backend: str) -> None:
    extra = (
        ["--node-rank", "1", "--master-addr", "node0"]
        if backend == "static"
        else ["--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29400", "--rdzv-id", "job7"]
    )
    assert main(["launch", str(TINY), *MULTI_NODE, *extra, "--output-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    command = out.split("# command:\n", 1)[1].splitlines()[0]
    assert "--standalone" not in command and "world size 16" in out
    if backend == "static":
        assert (
            "-m torch.distributed.run --nnodes=2 --node_rank=1 --master_addr=node0 --master_port=29400 "
            "--nproc_per_node=8 -m core.cli launch" in command
        )
        assert "run the same command on every node with --node-rank 0..1" in out
    else:
        assert (
            "--nnodes=2 --rdzv_backend=c10d --rdzv_endpoint=node0:29400 --rdzv_id=job7 --nproc_per_node=8" in command
            and "--node_rank" not in command
        )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags,key,fix",
    [
        (["--nodes", "2", "--node-rank", "2", "--master-addr", "node0"], "launch.node_rank", "--node-rank from 0 to 1"),
        (["--nodes", "2", "--node-rank", "1"], "launch.master_addr", "--master-addr HOST of node 0"),
        (["--master-addr", "node0", "--master-port", "70000"], "launch.master_port", "1..65535"),
        (["launch.rdzv_backend=etcd"], "launch.rdzv_backend", "'static', 'c10d'"),
        (["--rdzv-endpoint", "node0"], "launch.master_addr", "node0:29400"),
    ],
)
def test_multi_node_torchrun_is_validated(capsys: pytest.CaptureFixture, flags: list[str], key: str, fix: str) -> None:
    overrides = [f for f in flags if "=" in f]
    err = _error(
        capsys,
        ["launch", str(TINY), *overrides, "--launcher", "torchrun", *[f for f in flags if "=" not in f], "--dry-run"],
    )
    assert f"[{key}]" in err and fix in err, err
