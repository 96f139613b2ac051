"""Official DINOv2 semantics under every strategy: per-module clipping under ZeRO, the logged norms, the loss
normaliser without local crops, KoLeo's batch requirement, gradient accumulation and device placement."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from core.config import PretrainRecipe, load_recipe
from core.distributed.clipping import submodule_parameters
from core.distributed.env import free_port, init_distributed, shutdown_distributed
from core.distributed.strategy import SingleProcessStrategy, build_strategy
from core.errors import DinoscopeError
from core.ssl.meta_arch import loss_normaliser

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny" / "pretrain.yaml")
SHORT = [
    "train.max_iters=6",
    "train.checkpoint_every=6",
    "train.log_every=1",
    "data.params.n=64",
    "optim.warmup_epochs=0.02",
    "teacher.warmup_teacher_temp_epochs=0.05",
    "optim.freeze_last_layer_epochs=0.01",
]
ENV = {**os.environ, "DINOSCOPE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
CLIP = 0.05


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ clipping
def test_zero_stages_at_world_size_1_give_the_single_strategy_losses_with_clipping_on(tmp_path: Path) -> None:
    """DINOv2 clips backbone, dino_head and ibot_head separately; DeepSpeed's own clipping is one global norm."""
    runs = {}
    for name, extra in (
        ("single", []),
        ("zero2", ["dist.strategy=deepspeed", "dist.zero_stage=2"]),
        ("zero3", ["dist.strategy=deepspeed", "dist.zero_stage=3"]),
    ):
        runs[name] = tmp_path / name
        cmd = [
            sys.executable,
            "-m",
            "core.cli",
            "pretrain",
            TINY,
            *SHORT,
            "optim.clip_grad=0.5",
            *extra,
            "--output-dir",
            str(runs[name]),
        ]
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single = _rows(runs["single"])
    assert len(single) == 6
    assert all(r["grad_norm/backbone"] > 0.5 and r["grad_norm/dino_head"] > 0.5 for r in single)  # clipping acts
    for name, rel in (("zero2", 1e-6), ("zero3", 1e-5)):
        rows = _rows(runs[name])
        for got, want in zip(rows, single, strict=True):
            assert got["loss/total"] == pytest.approx(want["loss/total"], rel=rel, abs=0), name
            for key in ("grad_norm/backbone", "grad_norm/dino_head"):  # the logged norms are the clipped ones
                assert got[key] == pytest.approx(want[key], rel=rel, abs=0), (name, key)


def _tiny_pair() -> tuple[nn.ModuleDict, nn.ModuleDict]:
    torch.manual_seed(0)
    student = nn.ModuleDict(
        {
            "backbone": nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 8)),
            "dino_head": nn.Linear(8, 5),
            "ibot_head": nn.Linear(8, 3),
        }
    )
    return student, copy.deepcopy(student)


def _train(strategy: Any, rank: int, world: int, steps: int = 3) -> dict[str, Any]:
    student, teacher = _tiny_pair()
    groups = [{"params": list(m.parameters()), "lr_multiplier": 1.0} for m in student.values()]
    strategy.setup(student, teacher, groups, grad_clip=CLIP, precision="fp32")
    generator = torch.Generator().manual_seed(7)
    norms = []
    for _ in range(steps):
        x, y, z = (torch.randn(8, n, generator=generator) for n in (6, 5, 3))
        rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
        for group in strategy.param_groups:
            group["lr"], group["weight_decay"] = 0.05, 0.04
        features = student["backbone"](x[rows])
        loss = F.mse_loss(student["dino_head"](features), y[rows]) + F.mse_loss(student["ibot_head"](features), z[rows])
        strategy.backward(loss)
        norms.append({k: float(v) for k, v in strategy.clip_and_step().items()})
        strategy.zero_grad()
        strategy.update_teacher(0.9)
    return {
        "teacher": strategy.full_teacher_state_dict(),
        "student": strategy.full_student_state_dict(),
        "norms": norms,
    }


def _clip_worker(rank: int, port: int, stage: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    init_distributed("gloo")
    try:
        result = _train(
            build_strategy("deepspeed", zero_stage=stage, micro_batch_size=4, stage3_param_persistence_threshold=0),
            rank,
            2,
        )
        if rank == 0:
            torch.save(result, out)
    finally:
        shutdown_distributed()


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_rank_zero_clips_each_module_like_one_process(stage: int, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    out = tmp_path / "rank0.pt"
    context = mp.start_processes(
        _clip_worker, args=(free_port(), stage, str(out)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 180
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("distributed workers still running after 180 s")
    got = torch.load(out, weights_only=True)
    want = _train(SingleProcessStrategy(), rank=0, world=1)
    assert all(v > CLIP for step in want["norms"] for v in step.values())  # every module is clipped
    for got_step, want_step in zip(got["norms"], want["norms"], strict=True):
        assert got_step.keys() == {"backbone", "dino_head", "ibot_head"}
        assert got_step == pytest.approx(want_step, rel=1e-5)
    for key, value in want["student"].items():
        torch.testing.assert_close(got["student"][key], value, atol=1e-6, rtol=1e-5, msg=key)
        torch.testing.assert_close(got["teacher"][key], want["teacher"][key], atol=1e-6, rtol=1e-5, msg=key)


def test_norms_are_computed_only_when_asked_or_needed() -> None:
    student, teacher = _tiny_pair()
    strategy = SingleProcessStrategy()
    strategy.setup(student, teacher, [{"params": list(student.parameters())}], grad_clip=None)
    for compute, expected in ((False, set()), (True, {"backbone", "dino_head", "ibot_head"})):
        features = student["backbone"](torch.randn(4, 6))
        (student["dino_head"](features).sum() + student["ibot_head"](features).sum()).backward()
        norms = strategy.clip_and_step(compute_norms=compute)
        strategy.zero_grad()
        assert set(norms) == expected
        assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in norms.values())  # no host sync per step
    assert set(submodule_parameters(student)) == {"backbone", "dino_head", "ibot_head"}


# ------------------------------------------------------------------------------------------------ recipe semantics
def test_loss_normaliser_is_the_official_one_with_and_without_local_crops() -> None:
    assert loss_normaliser(8) == 18 and loss_normaliser(2) == 6
    assert loss_normaliser(0) == 3  # n_local_terms = max(2 * 0, 1), not 0


def test_no_local_crops_uses_the_official_normaliser(tmp_path: Path) -> None:
    from core.ssl.build import build_meta_arch

    recipe = load_recipe(PretrainRecipe, TINY, ["crops.local_crops_number=0"])
    meta = build_meta_arch(recipe)
    student = {
        "global_logits": torch.randn(4, 256),
        "global_cls": torch.randn(4, 32),
        "ibot_logits": torch.zeros(0, 256),
    }
    teacher = {"dino": torch.softmax(torch.randn(2, 2, 256), -1), "ibot": torch.zeros(0, 256)}
    losses = meta.compute_losses(student, teacher, {"collated_masks": torch.zeros(4, 16, dtype=torch.bool)})
    raw = meta.dino_loss([student["global_logits"]], [teacher["dino"].flatten(0, 1)])
    torch.testing.assert_close(losses["dino_global"], raw * 2 / 3)
    assert "dino_local" not in losses


def test_koleo_with_one_image_per_rank_is_a_clear_error() -> None:
    with pytest.raises(DinoscopeError, match="KoLeo regulariser needs at least 2 images per rank") as err:
        load_recipe(PretrainRecipe, TINY, ["train.batch_size_per_rank=1"])
    assert "dino.koleo_loss_weight=0" in str(err.value)
    recipe = load_recipe(PretrainRecipe, TINY, ["train.batch_size_per_rank=1", "dino.koleo_loss_weight=0"])
    assert recipe.train.batch_size_per_rank == 1


def test_dist_section_exposes_accumulation_and_communication_settings() -> None:
    recipe = load_recipe(
        PretrainRecipe,
        TINY,
        [
            "dist.grad_accum=4",
            "dist.overlap_comm=false",
            "dist.reduce_bucket_size=1000",
            "dist.stage3_max_reuse_distance=0",
        ],
    )
    assert (recipe.dist.grad_accum, recipe.dist.overlap_comm, recipe.dist.reduce_bucket_size) == (4, False, 1000)
    with pytest.raises(DinoscopeError, match="dist.grad_accum must be at least 1"):
        load_recipe(PretrainRecipe, TINY, ["dist.grad_accum=0"])
    with pytest.raises(DinoscopeError, match="reduce_bucket_sise"):
        load_recipe(PretrainRecipe, TINY, ["dist.reduce_bucket_sise=10"])


def test_gradient_accumulation_steps_on_the_whole_accumulated_batch(tmp_path: Path) -> None:
    """Each optimizer step takes ``dist.grad_accum`` micro-batches; the lr and the data position follow the images
    per step. (That the accumulated gradients equal the big batch's is tests/core/test_dist.py's zero1/zero3 case.)"""
    from core.cli import main
    from core.train.checkpoint import read_client_state

    runs = {}
    for name, extra in (
        ("big", ["train.batch_size_per_rank=8"]),
        ("accum", ["train.batch_size_per_rank=4", "dist.grad_accum=2"]),
    ):
        runs[name] = tmp_path / name
        assert (
            main(
                ["pretrain", TINY, *SHORT, "optim.scaling_rule=sqrt_wrt_1024", *extra, "--output-dir", str(runs[name])]
            )
            == 0
        )
    big, accum = _rows(runs["big"]), _rows(runs["accum"])
    assert [r["lr"] for r in accum] == [r["lr"] for r in big]
    assert read_client_state(runs["accum"])["sampler_state"]["samples_seen"] == 6 * 8
    assert all(r["loss/total"] == r["loss/total"] for r in accum)
