"""Distributed execution: launcher environments, collectives, EMA, strategies and ZeRO equivalence.

The acceptance test spawns 2 gloo ranks (each holding half of a global batch) and checks that after 3 steps the EMA
teacher, the student and the per-sub-module grad norms equal those of one process on the whole batch, for the
single-process strategy with data parallelism and for DeepSpeed ZeRO-1, 2 and 3.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from core.distributed import DistEnv, all_reduce_mean, barrier, build_strategy, is_main_process
from core.distributed.clipping import submodule_parameters
from core.distributed.ema import ema_update_, update_teacher
from core.distributed.env import first_slurm_host, free_port, init_distributed, shutdown_distributed
from core.distributed.strategy import SingleProcessStrategy, Strategy
from core.errors import DinoscopeError

REPO = Path(__file__).parents[2]
STEPS = 3
GLOBAL_BATCH = 8


# ------------------------------------------------------------------------------------------------ launcher layout
def test_torchrun_environment() -> None:
    env = {
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "node7",
        "MASTER_PORT": "1234",
    }
    assert DistEnv.from_environ(env) == DistEnv(
        rank=5,
        local_rank=1,
        world_size=8,
        local_world_size=4,
        master_addr="node7",
        master_port=1234,
        node_rank=1,
        num_nodes=2,
        launcher="torchrun",
    )


def test_deepspeed_launcher_environment() -> None:
    env = {
        "RANK": "3",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "6",
        "LOCAL_SIZE": "3",
        "CROSS_RANK": "1",
        "CROSS_SIZE": "2",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29501",
    }
    layout = DistEnv.from_environ(env)
    assert (layout.rank, layout.local_world_size, layout.node_rank, layout.num_nodes, layout.launcher) == (
        3,
        3,
        1,
        2,
        "deepspeed",
    )


def test_slurm_environment_uses_first_host_and_job_port() -> None:
    env = {
        "SLURM_PROCID": "6",
        "SLURM_LOCALID": "2",
        "SLURM_NTASKS": "8",
        "SLURM_NNODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_NODELIST": "gpu[003-004,010],cpu1",
        "SLURM_JOB_ID": "123456",
    }
    layout = DistEnv.from_environ(env)
    assert (layout.rank, layout.local_rank, layout.world_size, layout.local_world_size) == (6, 2, 8, 4)
    assert (layout.master_addr, layout.master_port, layout.node_rank, layout.launcher) == (
        "gpu003",
        20000 + 123456 % 20000,
        1,
        "slurm",
    )


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("node01", "node01"), ("a-b[7-9]", "a-b7"), ("rack[2,4]-n[1-2]", "rack2-n[1-2]"), ("x[01-02],y3", "x01")],
)
def test_first_slurm_host(nodelist: str, host: str) -> None:
    assert first_slurm_host(nodelist) == host


def test_single_process_defaults_and_identity_helpers() -> None:
    layout = DistEnv.from_environ({})
    assert (layout.rank, layout.world_size, layout.num_nodes, layout.is_distributed) == (0, 1, 1, False)
    assert init_distributed().world_size == 1 and not torch.distributed.is_initialized()
    tensor = torch.tensor([1.0, 3.0])
    assert all_reduce_mean(tensor) is tensor and tensor.tolist() == [1.0, 3.0]
    barrier()
    assert is_main_process()


def test_malformed_launcher_environment_is_a_user_error() -> None:
    with pytest.raises(DinoscopeError, match="rank 4 is outside"):
        DistEnv.from_environ({"RANK": "4", "WORLD_SIZE": "2"})
    with pytest.raises(DinoscopeError, match="malformed"):
        DistEnv.from_environ({"RANK": "zero", "WORLD_SIZE": "2"})


# ------------------------------------------------------------------------------------------------ EMA
def test_ema_update_formula_and_limits() -> None:
    teacher, student = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, -2.0])]
    ema_update_(teacher, student, 0.75)
    assert teacher[0].tolist() == [1.5, 1.0]  # 0.75 t + 0.25 s
    ema_update_(teacher, student, 1.0)
    assert teacher[0].tolist() == [1.5, 1.0]
    ema_update_(teacher, [s.to(torch.bfloat16) for s in student], 0.0)
    assert teacher[0].dtype == torch.float32 and teacher[0].tolist() == [3.0, -2.0]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ema_update_(teacher, student, 1.5)


def test_update_teacher_matches_by_name_and_rejects_other_structures() -> None:
    student, teacher = _tiny_pair()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    update_teacher(teacher, student, 0.9)
    for name, param in student.named_parameters():
        torch.testing.assert_close(teacher.get_parameter(name), 0.9 * before[name] + 0.1 * param, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="only in student"):
        update_teacher(nn.ModuleDict({"backbone": teacher["backbone"]}), student, 0.9)


# ------------------------------------------------------------------------------------------------ strategies
def test_build_strategy_table_and_lazy_deepspeed_import() -> None:
    assert isinstance(build_strategy("single", zero_stage=2, micro_batch_size=4), SingleProcessStrategy)
    with pytest.raises(DinoscopeError, match="unknown strategy 'fsdp'") as err:
        build_strategy("fsdp")
    assert "deepspeed, single" in str(err.value)
    code = (
        "import sys, core, core.distributed, core.train.checkpoint; from core.distributed import build_strategy; "
        "build_strategy('single'); assert 'deepspeed' not in sys.modules, 'deepspeed imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_single_strategy_clips_each_submodule_separately() -> None:
    student, teacher = _tiny_pair()
    strategy = SingleProcessStrategy()
    strategy.setup(student, teacher, _param_groups(student), grad_clip=0.05)
    x, y = _global_batches(1)[0]
    strategy.backward(_loss(student, x, y))
    raw = {
        name: torch.nn.utils.get_total_norm([p.grad for p in ps]).item()
        for name, ps in submodule_parameters(student).items()
    }
    norms = strategy.clip_and_step()
    assert norms.keys() == {"backbone", "head"} and {k: float(v) for k, v in norms.items()} == pytest.approx(raw)
    assert all(v > 0.05 for v in raw.values())
    for params in submodule_parameters(student).values():  # each module on its own at the limit
        assert torch.nn.utils.get_total_norm([p.grad for p in params]).item() == pytest.approx(0.05, rel=1e-4)
    assert [(g["lr_multiplier"], g["is_last_layer"]) for g in strategy.param_groups] == [(1.0, False), (0.5, True)]
    strategy.zero_grad()
    assert all(p.grad is None for p in student.parameters())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_single_strategy_mixed_precision_step(precision: str) -> None:
    student, teacher = _tiny_pair()
    strategy = SingleProcessStrategy(grad_accum=2)
    strategy.setup(student, teacher, _param_groups(student), grad_clip=1.0, precision=precision)
    before = copy.deepcopy(student.state_dict())
    x, y = _global_batches(1)[0]
    for half in (slice(0, 4), slice(4, 8)):
        with strategy.autocast():
            out = student["head"](student["backbone"](x[half]))
            assert out.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
            loss = F.mse_loss(out.float(), y[half])
        strategy.backward(loss)
    norms = strategy.clip_and_step()
    assert set(norms) == {"backbone", "head"} and all(0 < v < float("inf") for v in norms.values())
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert not torch.equal(before["head.weight"], student.state_dict()["head.weight"])


def test_bad_strategy_settings_are_user_errors() -> None:
    student, teacher = _tiny_pair()
    with pytest.raises(DinoscopeError, match="precision"):
        SingleProcessStrategy().setup(student, teacher, _param_groups(student), precision="fp8")  # type: ignore[arg-type]
    with pytest.raises(DinoscopeError, match="grad_clip"):
        SingleProcessStrategy().setup(student, teacher, _param_groups(student), grad_clip=-1.0)
    with pytest.raises(DinoscopeError, match="bad options for strategy 'single'"):
        build_strategy("single", nonsense=1)


def test_deepspeed_config_is_generated_from_typed_arguments_and_validated() -> None:
    ds_config = pytest.importorskip("core.distributed.deepspeed_config")
    ds = pytest.importorskip("core.distributed.deepspeed_strategy")
    cfg = ds_config.build_ds_config(
        zero_stage=3,
        micro_batch_size=4,
        grad_accum=2,
        world_size=2,
        grad_clip=3.0,
        precision="bf16",
        offload=True,
        overrides={"zero_optimization": {"overlap_comm": False}},
    )
    # clipping is per sub-module in the strategy, never DeepSpeed's single global norm
    assert cfg["train_batch_size"] == 16 and cfg["gradient_clipping"] == 0.0
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in cfg
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is False and zero["offload_param"]["device"] == "cpu"
    assert {"stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"} <= zero.keys()
    single_rank = {
        "zero_stage": 2,
        "micro_batch_size": 4,
        "grad_accum": 1,
        "world_size": 1,
        "grad_clip": None,
        "precision": "fp16",
    }
    ds_config.validate_ds_config(ds_config.build_ds_config(**single_rank))
    for bad in ({"zero_optimization": {"not_a_key": 1}}, {"train_batch_size": 3}):
        with pytest.raises(DinoscopeError, match="DeepSpeed rejects the generated config"):
            ds_config.validate_ds_config(ds_config.build_ds_config(**single_rank, overrides=bad))
    with pytest.raises(DinoscopeError, match="zero_stage must be one of"):
        ds.DeepSpeedStrategy(zero_stage=4)
    with pytest.raises(DinoscopeError, match="micro_batch_size must be >= 1"):
        build_strategy("deepspeed", micro_batch_size=0)


# ------------------------------------------------------------------------------------------------ equivalence
def _tiny_pair(seed: int = 0) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    torch.manual_seed(seed)
    student = nn.ModuleDict(
        {"backbone": nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 8)), "head": nn.Linear(8, 5)}
    )
    return student, copy.deepcopy(student)


def _param_groups(student: nn.ModuleDict) -> list[dict[str, Any]]:
    return [
        {
            "params": list(student["backbone"].parameters()),
            "lr_multiplier": 1.0,
            "wd_multiplier": 1.0,
            "is_last_layer": False,
        },
        {
            "params": list(student["head"].parameters()),
            "lr_multiplier": 0.5,
            "wd_multiplier": 0.0,
            "is_last_layer": True,
        },
    ]


def _global_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(123)
    return [
        (torch.randn(GLOBAL_BATCH, 6, generator=generator), torch.randn(GLOBAL_BATCH, 5, generator=generator))
        for _ in range(steps)
    ]


def _loss(student: nn.ModuleDict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student["head"](student["backbone"](x)), y)


def _train(strategy: Strategy, rank: int, world_size: int, grad_accum: int = 1) -> dict[str, Any]:
    """The loop's call sequence; each rank uses its contiguous share of every global batch, in micro-batches."""
    student, teacher = _tiny_pair()
    strategy.setup(student, teacher, _param_groups(student), grad_clip=None, precision="fp32")
    micro = GLOBAL_BATCH // world_size // grad_accum
    norms = []
    for it, (x, y) in enumerate(_global_batches(STEPS)):
        for group in strategy.param_groups:
            group["lr"] = 0.02 * (it + 1) * group["lr_multiplier"]
            group["weight_decay"] = 0.04 * group["wd_multiplier"]
        for m in range(grad_accum):
            rows = slice((rank * grad_accum + m) * micro, (rank * grad_accum + m + 1) * micro)
            with strategy.autocast():
                loss = _loss(student, x[rows], y[rows])
            strategy.backward(loss)
        norms.append({k: float(v) for k, v in strategy.clip_and_step().items()})
        strategy.zero_grad()
        strategy.update_teacher(0.9 - 0.1 * it)
    partitioned = [
        getattr(p, "ds_tensor", p).numel() < p.ds_numel for p in student.parameters() if hasattr(p, "ds_numel")
    ]
    return {
        "teacher": strategy.full_teacher_state_dict(),
        "student": strategy.full_student_state_dict(),
        "norms": norms,
        "partitioned": partitioned,
        "group_keys": [(g["lr_multiplier"], g["is_last_layer"]) for g in strategy.param_groups],
    }


# ZeRO-1 and ZeRO-3 also accumulate gradients over 2 micro-batches per step.
STRATEGY_KWARGS: dict[str, tuple[str, dict[str, Any]]] = {
    "single_dp": ("single", {}),
    "zero1": ("deepspeed", {"zero_stage": 1, "micro_batch_size": 2, "grad_accum": 2}),
    "zero2": ("deepspeed", {"zero_stage": 2, "micro_batch_size": 4}),
    "zero3": (
        "deepspeed",
        {"zero_stage": 3, "micro_batch_size": 2, "grad_accum": 2, "stage3_param_persistence_threshold": 0},
    ),
}


def _equivalence_worker(rank: int, port: int, variant: str, out: str) -> None:
    _join(rank, 2, port)
    name, kwargs = STRATEGY_KWARGS[variant]
    try:
        result = _train(build_strategy(name, **kwargs), rank, 2, kwargs.get("grad_accum", 1))
        if rank == 0:
            torch.save(result, out)
    finally:
        shutdown_distributed()
    if name == "deepspeed":  # single_dp keeps exiting normally: it checks shutdown_distributed end to end
        _exit_without_finalization()


def _exit_without_finalization() -> None:
    """End a worker whose results are on disk without interpreter finalization (reached only on success).

    shutdown_distributed() stops gloo's worker threads by freeing the groups, but DeepSpeed keeps its groups alive
    (module globals, engine objects), so their threads survive until exit. Such a thread may still be dropping the
    tensors of the last collective when finalization starts; it then asks for the GIL too late and the process
    aborts (SIGABRT, "terminate called without an active exception") after the test's work succeeded.
    shutdown_distributed() only makes that unlikely (it yields the GIL); skipping finalization makes it impossible.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _join(rank: int, world_size: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    init_distributed("gloo")


def spawn(fn: Callable[..., None], args: tuple[Any, ...], nprocs: int = 2, deadline_s: float = 120.0) -> None:
    """``mp.spawn`` that kills the workers instead of hanging the suite if a collective deadlocks."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    stop = time.monotonic() + deadline_s
    while not context.join(timeout=1.0):
        if time.monotonic() > stop:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers still running after {deadline_s} s (deadlock?)")


@pytest.mark.distributed
@pytest.mark.parametrize("variant", list(STRATEGY_KWARGS))
def test_two_processes_match_one_process(variant: str, tmp_path: Path) -> None:
    if STRATEGY_KWARGS[variant][0] == "deepspeed":
        pytest.importorskip("deepspeed")
    out = tmp_path / "rank0.pt"
    spawn(_equivalence_worker, (free_port(), variant, str(out)))
    got = torch.load(out, weights_only=True)
    want = _train(SingleProcessStrategy(), rank=0, world_size=1)
    initial = _tiny_pair()[0].state_dict()
    assert got["teacher"].keys() == want["teacher"].keys() == got["student"].keys()
    for key in want["teacher"]:
        torch.testing.assert_close(got["teacher"][key], want["teacher"][key], atol=1e-5, rtol=0, msg=key)
        torch.testing.assert_close(got["student"][key], want["student"][key], atol=1e-5, rtol=0, msg=key)
        assert not torch.allclose(want["teacher"][key], want["student"][key], atol=1e-4)  # EMA lags the student
        assert not torch.allclose(want["teacher"][key], initial[key], atol=1e-4)  # ...but has moved
    for got_step, want_step in zip(got["norms"], want["norms"], strict=True):
        assert got_step == pytest.approx(want_step, rel=1e-5)
    assert got["group_keys"] == [(1.0, False), (0.5, True)]
    if variant == "zero3":
        assert got["partitioned"] and all(got["partitioned"])  # the EMA really read gathered shards
