"""CosineScheduler / build_schedules parity with the official DINOv2 schedules, and the lr scaling rules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from core.errors import DinoscopeError
from core.train import CosineScheduler, Schedules, build_schedules, scaled_lr

FIXTURE = Path(__file__).parents[1] / "data" / "dinov2_reference" / "schedules.pt"


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def _values(schedule: CosineScheduler, n: int) -> torch.Tensor:
    return torch.tensor([schedule[i] for i in range(n)], dtype=torch.float64)


def _from_fixture_config(cfg: dict) -> Schedules:
    # One "epoch" of freeze_last iterations expresses every fixture length as a whole number of epochs.
    epoch_length = cfg["freeze_last"]
    return build_schedules(
        base_lr=cfg["lr"],
        min_lr=cfg["min_lr"],
        epochs=cfg["total"] // epoch_length,
        warmup_epochs=cfg["warmup"] // epoch_length,
        epoch_length=epoch_length,
        weight_decay=cfg["wd"],
        weight_decay_end=cfg["wd_end"],
        momentum_teacher=cfg["mom"],
        final_momentum_teacher=cfg["mom_end"],
        warmup_teacher_temp=cfg["tt_warm"],
        teacher_temp=cfg["tt"],
        warmup_teacher_temp_epochs=cfg["tt_warm_iters"] // epoch_length,
        freeze_last_layer_epochs=1,
    )


def test_build_schedules_matches_official_over_every_iteration(reference: dict) -> None:
    schedules = _from_fixture_config(reference["config"])
    for name, expected in reference["outputs"].items():
        actual = _values(getattr(schedules, name), len(expected))
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0, msg=lambda m, k=name: f"{k}: {m}")
    at_50 = schedules.at(50)
    assert at_50 == {name: reference["outputs"][name][50].item() for name in at_50}


def test_cosine_scheduler_direct_construction_matches_lr(reference: dict) -> None:
    cfg = reference["config"]
    lr = CosineScheduler(cfg["lr"], cfg["min_lr"], cfg["total"], warmup_iters=cfg["warmup"])
    assert len(lr) == cfg["total"]
    torch.testing.assert_close(_values(lr, 105), reference["outputs"]["lr"], atol=1e-6, rtol=0)
    assert lr[0] == 0.0 and lr[cfg["warmup"]] == pytest.approx(cfg["lr"])
    assert lr[10_000] == cfg["min_lr"]


def test_freeze_iters_prepends_zeros_before_warmup() -> None:
    schedule = CosineScheduler(1.0, 0.0, total_iters=20, warmup_iters=4, start_warmup_value=0.5, freeze_iters=3)
    values = [schedule[i] for i in range(20)]
    assert values[:3] == [0.0, 0.0, 0.0]
    assert values[3:7] == pytest.approx([0.5, 2 / 3, 5 / 6, 1.0])
    assert values[7] == pytest.approx(1.0)
    assert values[19] == pytest.approx(0.5 * (1 + math.cos(math.pi * 12 / 13)))
    assert schedule[20] == 0.0


def test_scheduler_rejects_warmup_longer_than_run() -> None:
    with pytest.raises(DinoscopeError, match="exceed total_iters") as info:
        CosineScheduler(1.0, 0.0, total_iters=5, warmup_iters=4, freeze_iters=2)
    assert info.value.field == "warmup_iters" and info.value.fix
    with pytest.raises(IndexError):
        CosineScheduler(1.0, 0.0, total_iters=5)[-1]


def test_scaled_lr_rules() -> None:
    # ViT-L/16 short recipe: 32 GPUs x 64 images at base 4e-3 gives 4e-3 * sqrt(2).
    assert scaled_lr(4e-3, batch_size_per_rank=64, world_size=32) == pytest.approx(4e-3 * math.sqrt(2))
    assert scaled_lr(1e-3, 32, 8, rule="linear_wrt_256") == pytest.approx(1e-3)
    assert scaled_lr(1e-3, 32, 8, rule="none") == 1e-3
    with pytest.raises(DinoscopeError, match="unknown lr scaling rule") as info:
        scaled_lr(1e-3, 32, 8, rule="cubic")
    assert "sqrt_wrt_1024" in info.value.fix
    with pytest.raises(DinoscopeError, match="must be >= 1"):
        scaled_lr(1e-3, 0, 8)
