"""Training building blocks: per-iteration schedules, lr scaling and optimizer parameter groups."""

from __future__ import annotations

from core.train.param_groups import (
    ParamGroup,
    apply_optim_schedule,
    fuse_params_groups,
    get_params_groups_with_decay,
)
from core.train.schedules import CosineScheduler, Schedules, build_schedules, scaled_lr

__all__ = [
    "CosineScheduler",
    "ParamGroup",
    "Schedules",
    "apply_optim_schedule",
    "build_schedules",
    "fuse_params_groups",
    "get_params_groups_with_decay",
    "scaled_lr",
]
