"""``dinoscope launch``: validation before anything starts, dry runs, SLURM rendezvous and requeue, and real runs
(in-process, 2 local processes with ZeRO-2/ZeRO-3, submitit's local executor, tiny distillation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.cli import main
from core.config.pretrain import PretrainRecipe
from core.errors import DinoscopeError
from core.launch import check_data_paths, plan_launch
from core.launch.kinds import CORE_KINDS, RecipeKind
from core.launch.resources import LaunchResources, load_resources, parse_time_minutes
from core.launch.slurm import TrainingJob, rendezvous_environ, training_job

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
TINY = RECIPES / "tiny" / "pretrain.yaml"
VITG = RECIPES / "cluster" / "pretrain_vitg14_16nodes.yaml"
VITG_RESOURCES = RECIPES / "launch" / "slurm_16nodes_8gpus.yaml"
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
FOUR_ITERS = [
    "train.max_iters=4",
    "train.checkpoint_every=4",
    "train.log_every=1",
    "data.params.n=64",
    "train.batch_size_per_rank=8",
    "optim.warmup_epochs=0.02",
    "optim.freeze_last_layer_epochs=0.01",
    "teacher.warmup_teacher_temp_epochs=0.02",
]


def _iterations(run: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------------------------------ validation before start
def test_recipe_typo_fails_in_under_2s_naming_the_closest_key(tmp_path: Path) -> None:
    run = tmp_path / "run"
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "core.cli",
            "launch",
            str(TINY),
            "optim.bse_lr=0.1",
            "--launcher",
            "torchrun",
            "--nproc",
            "2",
            "--output-dir",
            str(run),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2
    assert "optim.bse_lr" in proc.stderr and "did you mean optim.'base_lr'" in proc.stderr
    assert elapsed < 2.0, f"a typo must fail fast, took {elapsed:.2f} s"
    assert not run.exists()


def test_typo_inside_recipe_file_names_file_line_and_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(TINY.read_text().replace("  base_lr: 0.001", "  base_lrr: 0.001"))
    err = _error(capsys, ["launch", str(recipe), "--dry-run"])
    line = recipe.read_text().splitlines().index("  base_lrr: 0.001") + 1
    assert f"{recipe}:{line}" in err and "optim.base_lrr" in err and "'base_lr'" in err


def test_wrong_type_and_unknown_kind_fail(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = _error(capsys, ["launch", str(TINY), "train.batch_size_per_rank=many", "--dry-run"])
    assert "wrong type for 'train.batch_size_per_rank'" in err
    recipe = tmp_path / "kind.yaml"
    recipe.write_text(TINY.read_text().replace("kind: pretrain", "kind: pretrian"))
    err = _error(capsys, ["launch", str(recipe), "--dry-run"])
    assert "unknown recipe kind 'pretrian'" in err and "'pretrain'" in err


def test_resources_typo_and_bad_values_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    res = tmp_path / "res.yaml"
    res.write_text("launcher: slurm\nnodse: 2\n")
    err = _error(capsys, ["launch", str(TINY), "--resources", str(res), "--dry-run"])
    assert "launch.nodse" in err and "'nodes'" in err and f"{res}:2" in err
    err = _error(capsys, ["launch", str(TINY), "launch.gpus_per_nod=8", "--dry-run"])
    assert "gpus_per_nod" in err and "'gpus_per_node'" in err
    with pytest.raises(DinoscopeError, match="wrong type for 'nodes'"):
        load_resources(None, ["nodes=many"])
    with pytest.raises(DinoscopeError, match="not a SLURM time limit"):
        load_resources(None, ["time=soon"])
    with pytest.raises(DinoscopeError, match="use one of"):
        load_resources(None, ["launcher=mpi"])
    with pytest.raises(DinoscopeError, match="use --launcher torchrun"):
        load_resources(None, ["nproc_per_node=2"])
    with pytest.raises(DinoscopeError, match="or --launcher slurm"):
        load_resources(None, ["launcher=deepspeed", "nodes=2"])
    with pytest.raises(DinoscopeError, match="--key=value or --flag"):
        load_resources(None, ["launcher=slurm", "time=10", "sbatch_extra=[exclusive]"])
    with pytest.raises(DinoscopeError, match="needs a time limit"):
        load_resources(None, ["launcher=slurm"])


@pytest.mark.parametrize(
    "text,minutes",
    [("90", 90), ("90:30", 91), ("72:00:00", 4320), ("2-00", 2880), ("1-12:30", 2190), ("3-00:00:00", 4320)],
)
def test_slurm_time_formats(text: str, minutes: int) -> None:
    assert parse_time_minutes(text) == minutes


def test_unquoted_yaml_time_is_kept_as_written(tmp_path: Path) -> None:
    res = tmp_path / "res.yaml"
    res.write_text("launcher: slurm\ntime: 72:00:00  # YAML 1.1 would read 259200\n")
    assert load_resources(res).time == "72:00:00"
    assert load_resources(res, ["time=1-00:00:00"]).time == "1-00:00:00"


def test_missing_data_path_fails_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    err = _error(
        capsys,
        [
            "launch",
            str(RECIPES / "geo" / "pretrain_vits14_zero2.yaml"),
            "--launcher",
            "torchrun",
            "--nproc",
            "2",
            "--output-dir",
            str(run),
        ],
    )
    assert "[data.params.paths]" in err and "data/geo/rgb_tiles" in err and "does not exist" in err
    assert not run.exists()
    err = _error(
        capsys,
        [
            "launch",
            str(RECIPES / "tiny" / "distill.yaml"),
            "distill.teacher_weights=" + str(tmp_path / "none.safetensors"),
            "--output-dir",
            str(run),
        ],
    )
    assert "[distill.teacher_weights]" in err and "none.safetensors" in err


def test_check_data_paths_accepts_files_dirs_and_globs_and_ignores_outputs(tmp_path: Path) -> None:
    from core.config import load_recipe

    (tmp_path / "a.tif").write_bytes(b"")
    ok = [
        f"data.params.paths=[{tmp_path / 'a.tif'},{tmp_path}/*.tif,{tmp_path}]",
        "data.kind=geotiff",
        f"train.output_dir={tmp_path / 'not' / 'yet'}",
    ]
    check_data_paths(load_recipe(PretrainRecipe, TINY, ok))
    # data.kind geotiff declares `paths` an input (synthetic_shapes, TINY's kind, reads no files)
    glob_recipe = [f"data.params.paths={tmp_path}/*.png", "data.kind=geotiff"]
    with pytest.raises(DinoscopeError, match=r"\*\.png' does not exist") as info:
        check_data_paths(load_recipe(PretrainRecipe, TINY, glob_recipe))
    assert info.value.field == "data.params.paths"
    with pytest.raises(DinoscopeError) as info:
        check_data_paths(load_recipe(PretrainRecipe, TINY, [f"model.pretrained={tmp_path / 'w.pth'}"]))
    assert info.value.field == "model.pretrained"


def test_run_dir_comes_from_the_cli_then_the_recipe_then_the_kind() -> None:
    from core.config import load_recipe
    from core.launch import resolve_run_dir

    recipe = load_recipe(PretrainRecipe, TINY)
    assert resolve_run_dir(recipe, "pretrain", TINY, "elsewhere") == Path("elsewhere")
    assert resolve_run_dir(recipe, "pretrain", TINY) == Path("runs/tiny/pretrain")
    nested = type("Embed", (), {"output": type("Output", (), {"dir": "runs/cells_embed"})()})()
    assert resolve_run_dir(nested, "cells_embed", "x/embed.yaml") == Path("runs/cells_embed")
    assert resolve_run_dir(object(), "canopy_predict", "x/hrch.yaml") == Path("runs/canopy_predict/hrch")


def test_global_batch_the_world_size_does_not_divide_fails(capsys: pytest.CaptureFixture) -> None:
    common = ["launch", str(VITG), "--resources", str(VITG_RESOURCES), "--dry-run"]
    err = _error(capsys, [*common, "--nodes", "10"])  # 80 ranks, global batch 1536
    assert "global batch size 1536 is not divisible by the world size 80" in err and "1520 or 1600" in err
    err = _error(capsys, [*common, "--nodes", "8"])  # 64 ranks: divisible, but 12 x 64 != 1536
    assert "train.batch_size_per_rank 12 x world size 64 = 768" in err
    assert "set train.batch_size_per_rank=24" in err
    assert (
        main(
            [
                "launch",
                str(VITG),
                "train.batch_size_per_rank=24",
                "--resources",
                str(VITG_RESOURCES),
                "--nodes",
                "8",
                "--dry-run",
            ]
        )
        == 0
    )
    with pytest.raises(DinoscopeError, match="not divisible by the world size 3"):
        plan_launch(TINY, [], LaunchResources(launcher="torchrun", nproc_per_node=3, global_batch_size=16))


def test_single_process_kind_refuses_several_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(CORE_KINDS, "pretrain", lambda: RecipeKind(PretrainRecipe, lambda r, d: 0, distributed=False))
    with pytest.raises(DinoscopeError, match="runs as a single process"):
        plan_launch(TINY, [], LaunchResources(launcher="torchrun", nproc_per_node=2))
    assert plan_launch(TINY, [], LaunchResources()).world_size == 1


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


# ------------------------------------------------------------------------------------------ real runs
def test_local_launch_runs_the_tiny_recipe_in_process(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["launch", str(TINY), *TWO_ITERS, "--output-dir", str(run)]) == 0
    for name in ("config.yaml", "run_info.json", "launch.json", "metrics.jsonl", "loss_curve.png"):
        assert (run / name).exists(), name
    assert _iterations(run) == [1, 2]
    record = json.loads((run / "launch.json").read_text())
    assert record["resources"]["launcher"] == "local" and record["world_size"] == 1 and record["kind"] == "pretrain"


def test_tiny_distill_recipe_trains_a_student_against_a_frozen_teacher(tmp_path: Path) -> None:
    from core.models import VisionTransformer
    from core.train.checkpoint import consolidated_teacher_state_dict
    from core.weights import WeightMeta, save_backbone
    from core.weights.meta import default_normalisation

    kwargs = {
        "img_size": 32,
        "patch_size": 8,
        "in_chans": 3,
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 4,
        "init_values": 1e-5,
    }
    teacher = VisionTransformer(**kwargs)
    mean, std = default_normalisation(3)
    weights = save_backbone(
        teacher,
        WeightMeta(arch="vit_test", model_kwargs=kwargs, channel_names=["r", "g", "b"], mean=mean, std=std),
        tmp_path / "teacher.safetensors",
    )
    run = tmp_path / "distill"
    assert (
        main(
            [
                "launch",
                str(RECIPES / "tiny" / "distill.yaml"),
                *TWO_ITERS,
                f"distill.teacher_weights={weights}",
                "--output-dir",
                str(run),
            ]
        )
        == 0
    )
    assert _iterations(run) == [1, 2]
    saved = consolidated_teacher_state_dict(run)
    frozen = {k[len("backbone.") :]: v for k, v in saved.items() if k.startswith("backbone.")}
    assert frozen.keys() == teacher.state_dict().keys()
    assert all(torch.equal(frozen[k], v) for k, v in teacher.state_dict().items()), "the teacher must stay frozen"
    assert saved["backbone.cls_token"].shape[-1] == 64  # teacher 64 wide, student 32 wide


@pytest.mark.distributed
@pytest.mark.parametrize("launcher,stage", [("torchrun", 2), ("deepspeed", 3)])
def test_two_local_processes_with_zero(tmp_path: Path, launcher: str, stage: int) -> None:
    run = tmp_path / f"zero{stage}"
    env = {**os.environ, "DINOSCOPE_NO_PROGRESS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "core.cli",
            "launch",
            str(TINY),
            *FOUR_ITERS,
            "dist.strategy=deepspeed",
            f"dist.zero_stage={stage}",
            "--launcher",
            launcher,
            "--nproc",
            "2",
            "--global-batch-size",
            "16",
            "--output-dir",
            str(run),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _iterations(run) == [1, 2, 3, 4]
    assert (run / "checkpoints" / "step_00000004" / "deepspeed").is_dir()
    record = json.loads((run / "launch.json").read_text())
    assert record["world_size"] == 2 and record["resources"]["launcher"] == launcher
    assert record["command"][:3] == [
        sys.executable,
        "-m",
        "torch.distributed.run" if launcher == "torchrun" else "deepspeed.launcher.runner",
    ]


@pytest.mark.distributed
def test_two_torchrun_nodes_on_this_machine(tmp_path: Path) -> None:
    """Two "nodes" (two torchrun commands with node ranks 0 and 1) join over a static rendezvous and train."""
    from core.distributed.env import free_port

    run, port = tmp_path / "run", free_port()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "DINOSCOPE_NO_PROGRESS": "1"}
    base = [
        sys.executable,
        "-m",
        "core.cli",
        "launch",
        str(TINY),
        "train.max_iters=3",
        "train.log_every=1",
        "train.checkpoint_every=3",
        "data.params.n=64",
        "optim.warmup_epochs=0.01",
        "teacher.warmup_teacher_temp_epochs=0.01",
        "optim.freeze_last_layer_epochs=0.01",
        "--launcher",
        "torchrun",
        "--nodes",
        "2",
        "--nproc",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        "--output-dir",
        str(run),
    ]
    nodes = [
        subprocess.Popen(
            [*base, "--node-rank", str(rank)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        logs = [node.communicate(timeout=120)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()  # a no-op for a node that has exited; a hung rendezvous must not outlive the test
    assert [node.returncode for node in nodes] == [0, 0], "\n----\n".join(log[-3000:] for log in logs)
    assert _iterations(run) == [1, 2, 3]
    record = json.loads((run / "launch.json").read_text())
    assert record["world_size"] == 2 and record["resources"]["node_rank"] == 0 and "--node_rank=0" in record["command"]
