"""bench/gpu_check.sh without a GPU (a distinct exit status, no training) and in its CPU smoke mode, and the FLOP
count of bench/flops.py (hand-computed values; stochastic depth scales the student's blocks and nothing else)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"

# bench/ is a folder of scripts, not a package: load the module from its file.
_spec = importlib.util.spec_from_file_location("bench_flops", ROOT / "bench" / "flops.py")
assert _spec is not None and _spec.loader is not None
flops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flops)


def _run_script(env_extra: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_CHECK_CPU_SMOKE")},
        "PYTHON": sys.executable,
        **env_extra,
    }
    return subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


# ---------------------------------------------------------------------------------------------- gpu_check.sh
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_check_without_cuda_says_so_and_exits_3(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    proc = _run_script({"OUT": str(tmp_path)}, timeout=60)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.strip().splitlines() == [
        "gpu_check: no CUDA device visible (torch.cuda.is_available() is False); nothing was measured"
    ]
    assert elapsed < 60
    # Nothing was trained: the only result written is the error line.
    lines = (tmp_path / "gpu_check.jsonl").read_text().splitlines()
    assert [set(json.loads(line)) for line in lines] == [{"error"}]


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_the_three_strategies(tmp_path: Path) -> None:
    proc = _run_script({"OUT": str(tmp_path), "GPU_CHECK_CPU_SMOKE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    train = [r for r in rows if "strategy" in r]
    assert [r["strategy"] for r in train] == ["single", "zero2", "zero3"]
    for r in train:
        assert r["exit_status"] == 0 and r["images_per_s"] > 0 and r["iterations"] == 3
        assert r["mfu"] > 0 and r["max_memory_mb"] > 0 and r["wall_s"] > 0
    assert any(r.get("bench") == "ssl_step" and r.get("images_per_s", 0) > 0 for r in rows)
    saved = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert saved == rows


# ---------------------------------------------------------------------------------------------- FLOP count
def test_block_flops_by_hand() -> None:
    # dim 2, 3 tokens, MLP hidden 8: qkv 2*3*2*6 = 72, proj 2*3*2*2 = 24, MLP 2*2*3*2*8 = 192, attention 4*9*2 = 72.
    assert flops.block_forward_flops(2, 3, 8) == 72 + 24 + 192 + 72
    # ViT-L block at 224/14 (257 tokens): Narayanan et al.'s 24 T D^2 + 4 T^2 D per image.
    t, d = 257, 1024
    assert flops.block_forward_flops(d, t, 4 * d) == 24 * t * d**2 + 4 * t**2 * d
    # The whole ViT-L/14 forward at 224 is ~162 GFLOP (~81 GMAC, as usually quoted for ViT-L/14).
    vitl = 24 * flops.block_forward_flops(d, t, 4 * d) + flops.patch_embed_flops(d, 256, 14, 3)
    assert 160e9 < vitl < 163e9


def test_head_flops_by_hand() -> None:
    # in 4 -> hidden 8 -> hidden 8 -> bottleneck 2 -> 16 prototypes: 2 * (32 + 64 + 16 + 32).
    assert flops.head_forward_flops(4, 8, 2, 16, nlayers=3) == 2 * (32 + 64 + 16 + 32)
    assert flops.head_forward_flops(4, 8, 2, 16, nlayers=1) == 2 * (4 * 2 + 2 * 16)


def test_step_flops_by_hand() -> None:
    # dim 2, one block, patch 1: global 2x2 (4 patches + cls = 5 tokens), one local 1x1 (2 tokens), drop rate 0.5.
    f = flops.ssl_step_flops_per_image(
        dim=2, depth=1, patch_size=1, global_size=2, local_size=1, n_local=1, drop_path_rate=0.5, heads=False
    )
    block_g = 2 * 5 * 2 * 6 + 2 * 5 * 2 * 2 + 4 * 5 * 2 * 8 + 4 * 25 * 2  # 680
    block_l = 2 * 2 * 2 * 6 + 2 * 2 * 2 * 2 + 4 * 2 * 2 * 8 + 4 * 4 * 2  # 224
    embed_g, embed_l = 2 * 4 * 3 * 2, 2 * 1 * 3 * 2
    assert f["student_blocks"] == 3 * 0.5 * (2 * block_g + block_l)
    assert f["student_patch_embed"] == 3 * (2 * embed_g + embed_l)
    assert f["teacher_blocks"] == 2 * block_g and f["teacher_patch_embed"] == 2 * embed_g
    assert f["total"] == 3 * 0.5 * (2 * 680 + 224) + 3 * (96 + 12) + 2 * 680 + 96 == 4156


VITL = {"dim": 1024, "depth": 24, "patch_size": 14, "global_size": 224, "local_size": 98, "n_local": 8}


def test_drop_path_scales_only_the_student_blocks() -> None:
    full = flops.ssl_step_flops_per_image(**VITL, drop_path_rate=0.0)
    dropped = flops.ssl_step_flops_per_image(**VITL, drop_path_rate=0.4)
    assert dropped["student_blocks"] == pytest.approx(0.6 * full["student_blocks"])
    for part in full:
        if part not in ("student_blocks", "total"):
            assert dropped[part] == full[part], part
    assert full["total"] - dropped["total"] == pytest.approx(0.4 * full["student_blocks"])
    # With the batch size, the kept count is rounded down per set, as the efficient implementation does:
    # 38 of 64 global crops and 153 of 256 local crops at 32 images.
    exact = flops.ssl_step_flops_per_image(**VITL, drop_path_rate=0.4, batch=32)
    per_g = 24 * flops.block_forward_flops(1024, 257, 4096)
    per_l = 24 * flops.block_forward_flops(1024, 50, 4096)
    assert exact["student_blocks"] == pytest.approx(3 * (2 * per_g * 38 / 64 + 8 * per_l * 153 / 256))
    # At 0.1 or less the model multiplies a mask instead and skips nothing.
    assert flops.ssl_step_flops_per_image(**VITL, drop_path_rate=0.1)["total"] == full["total"]


def test_heads_and_linear_drop_path() -> None:
    no_heads = flops.ssl_step_flops_per_image(**VITL, drop_path_rate=0.4, heads=False)
    heads = flops.ssl_step_flops_per_image(**VITL, drop_path_rate=0.4)
    head = flops.head_forward_flops(1024, 2048, 256, 65536)
    masked = 2 * 0.5 * 0.3 * 256  # expected masked patches per image: 2 crops x p 0.5 x mean ratio 0.3 x 256
    assert heads["student_heads"] == pytest.approx(3 * (10 + masked) * head)
    assert heads["teacher_heads"] == pytest.approx((2 + masked) * head)
    assert heads["total"] - no_heads["total"] == pytest.approx(heads["student_heads"] + heads["teacher_heads"])
    assert flops.block_rates(0.4, 5, uniform=False) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_mfu() -> None:
    assert flops.mfu(100.0, 1e12, peak_tflops=1000.0) == pytest.approx(0.1)
    assert flops.mfu(100.0, 1e12, peak_tflops=1000.0, n_devices=2) == pytest.approx(0.05)


def _fake_run(tmp_path: Path, rates: list[float]) -> Path:
    from core.config.pretrain import PretrainRecipe

    recipe = PretrainRecipe()
    recipe.model.arch, recipe.model.patch_size, recipe.model.drop_path_rate = "vit_large", 14, 0.4
    recipe.crops.local_crops_size = 98
    recipe.train.batch_size_per_rank = 32
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(recipe)))
    (tmp_path / "run_info.json").write_text(json.dumps({"world_size": 1}))
    rows = [
        {"iteration": i + 1, "images_per_s": r, "max_memory_mb": 1000.0 + i, "loss/total": 9.0}
        for i, r in enumerate(rates)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_summarize_run_takes_the_median_after_warmup(tmp_path: Path) -> None:
    run = _fake_run(tmp_path, [1.0, 2.0, 300.0, 100.0, 200.0])
    out = flops.summarize_run(run, warmup=2, peak_tflops=989.0)
    assert out["images_per_s"] == 200.0 and out["measured_iterations"] == 3 and out["iterations"] == 5
    assert out["max_memory_mb"] == 1004.0
    per_image = flops.ssl_step_flops_per_image(**VITL, drop_path_rate=0.4, batch=32)["total"]
    assert out["mfu"] == pytest.approx(200.0 * per_image / 989e12, rel=1e-3)


def test_summary_cli_reports_a_run_without_metrics(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert flops.main([str(tmp_path / "missing"), "--strategy", "zero3", "--exit-status", "124"]) == 1
    line = json.loads(capsys.readouterr().out)
    assert line["strategy"] == "zero3" and line["exit_status"] == 124 and "error" in line


def test_step_bench_mfu_uses_the_same_count() -> None:
    f = flops.ssl_step_flops_per_image(**VITL, drop_path_rate=0.4, batch=32)["total"]
    assert flops.ssl_step_bench_mfu(250.0, [], peak_tflops=989.0) == pytest.approx(250.0 * f / 989e12, rel=1e-3)
    small = ["--arch", "vit_small", "--batch", "64", "--attn", "sdpa", "--steps", "10"]
    f_small = flops.ssl_step_flops_per_image(
        dim=384, depth=12, patch_size=14, global_size=224, local_size=98, n_local=8, drop_path_rate=0.4, batch=64
    )["total"]
    assert flops.ssl_step_bench_mfu(1000.0, small) == pytest.approx(1000.0 * f_small / 989e12, rel=1e-3)
