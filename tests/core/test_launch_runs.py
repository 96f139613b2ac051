"""``dinoscope launch`` real runs: in-process, tiny distillation, 2 local processes with ZeRO-2/ZeRO-3 and two
torchrun nodes on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.cli import main

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
