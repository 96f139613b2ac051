"""torchrun worker for ``test_requeue.py::test_resharded_state_equals_the_saved_state`` (not a test module).

torchrun --nproc_per_node 2 reshard_worker.py save OUT    # ZeRO-2: 3 steps, checkpoint, expected full state
torchrun --nproc_per_node N reshard_worker.py check OUT   # load at world size N, compare, take one more step
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_fp32_param
from torch import nn

from core.distributed.env import get_rank, get_world_size, init_distributed, shutdown_distributed
from core.distributed.strategy import build_strategy
from core.train.checkpoint import load_training_state, save_training_state

GLOBAL_BATCH = 12  # divisible by 1, 2 and 3 ranks
KEYS = ("exp_avg", "exp_avg_sq")


def _models() -> tuple[nn.ModuleDict, nn.ModuleDict]:
    torch.manual_seed(0)
    student = nn.ModuleDict(
        {"backbone": nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 8)), "head": nn.Linear(8, 5)}
    )
    return student, copy.deepcopy(student)


def _strategy(load_universal: bool) -> tuple[object, nn.ModuleDict]:
    student, teacher = _models()
    strategy = build_strategy(
        "deepspeed", zero_stage=2, micro_batch_size=GLOBAL_BATCH // get_world_size(), load_universal=load_universal
    )
    groups = [
        {"params": list(student["backbone"].parameters()), "lr_multiplier": 1.0},
        {"params": list(student["head"].parameters()), "lr_multiplier": 0.5},
    ]
    strategy.setup(student, teacher, groups, grad_clip=0.05)
    return strategy, student


def _step(strategy: object, student: nn.ModuleDict, it: int) -> None:
    generator = torch.Generator().manual_seed(100 + it)
    x, y = torch.randn(GLOBAL_BATCH, 6, generator=generator), torch.randn(GLOBAL_BATCH, 5, generator=generator)
    share = GLOBAL_BATCH // get_world_size()
    rows = slice(get_rank() * share, (get_rank() + 1) * share)
    for group in strategy.param_groups:
        group["lr"], group["weight_decay"] = 0.01 * group["lr_multiplier"], 0.04
    strategy.backward(F.mse_loss(student["head"](student["backbone"](x[rows])), y[rows]))
    strategy.clip_and_step()
    strategy.zero_grad()
    strategy.update_teacher(0.9)


def _full_moment(strategy: object, param: nn.Parameter, key: str) -> torch.Tensor:
    """One AdamW moment of a parameter, read from the ZeRO-1/2 flat partitions and summed over ranks.

    Read straight from the optimizer state (not through DeepSpeed's optimizer-state fragment links, which it sets
    up lazily after the first step), so the check does not depend on what it verifies.
    """
    full = torch.zeros(param.numel(), dtype=torch.float32)
    mapping = param._hp_mapping
    if mapping is not None:
        zero = strategy.engine.optimizer
        flat = zero.single_partition_of_fp32_groups[mapping.param_group_index]
        fragment = zero.optimizer.state[flat][key].narrow(
            0, mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel
        )
        full.narrow(0, mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel).copy_(fragment)
    torch.distributed.all_reduce(full)
    return full.view_as(param)


def _full_state(strategy: object, student: nn.ModuleDict) -> dict[str, torch.Tensor]:
    """Full fp32 parameters and AdamW moments (collective)."""
    state = {}
    for name, param in student.named_parameters():
        state[f"{name}.fp32"] = safe_get_full_fp32_param(param).detach().cpu().clone()
        for key in KEYS:
            state[f"{name}.{key}"] = _full_moment(strategy, param, key)
    return state


def main(mode: str, out: Path) -> None:
    init_distributed("gloo", require_group=True)
    strategy, student = _strategy(load_universal=mode == "check")
    if mode == "save":
        for it in range(3):
            _step(strategy, student, it)
        save_training_state(out, 3, strategy, config={"train": {"seed": 0}})
        expected = _full_state(strategy, student)
        if get_rank() == 0:
            torch.save(expected, out / "expected.pt")
    else:
        load_training_state(out, strategy)
        got = _full_state(strategy, student)
        if get_rank() == 0:
            expected = torch.load(out / "expected.pt", weights_only=True)
            assert got.keys() == expected.keys()
            for key, value in expected.items():
                assert torch.equal(got[key], value), f"{key} differs after resharding to {get_world_size()} ranks"
        _step(strategy, student, 3)  # and training continues
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
