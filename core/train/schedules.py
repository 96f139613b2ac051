"""Per-iteration training schedules: learning rate, weight decay, teacher momentum and temperature, last-layer lr.

Schedules are precomputed arrays indexed by iteration, as in DINOv2. An "epoch" is ``epoch_length`` iterations
(DINOv2 uses a fixed ``OFFICIAL_EPOCH_LENGTH = 1250`` regardless of dataset size).

References:
    Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", arXiv:2304.07193, section 5 and
    appendix (cosine schedules, sqrt learning-rate scaling); reference code facebookresearch/dinov2
    ``dinov2/utils/utils.py`` (``CosineScheduler``), ``dinov2/train/train.py`` (``build_schedulers``) and
    ``dinov2/utils/config.py`` (``sqrt_wrt_1024`` scaling rule).
    Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", arXiv:1608.03983 (cosine annealing).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from core.errors import DinoscopeError

__all__ = ["LR_SCALING_RULES", "CosineScheduler", "Schedules", "build_schedules", "scaled_lr"]


class CosineScheduler:
    """Frozen zeros, then linear warmup, then cosine annealing; ``final_value`` past the end.

    The array is ``freeze_iters`` zeros, ``linspace(start_warmup_value, base_value, warmup_iters)`` (end point
    included), then ``final + (base - final) (1 + cos(pi i / n)) / 2`` for ``i = 0 .. n - 1``.

    Args:
        base_value: value reached at the end of warmup (start of the cosine).
        final_value: value the cosine tends to, and the value returned at or past ``total_iters``.
        total_iters: length of the precomputed schedule.
        warmup_iters: length of the linear warmup.
        start_warmup_value: first warmup value.
        freeze_iters: leading iterations held at 0, before the warmup.
    """

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0,
        freeze_iters: int = 0,
    ) -> None:
        for field, value in (
            ("total_iters", total_iters),
            ("warmup_iters", warmup_iters),
            ("freeze_iters", freeze_iters),
        ):
            if value < 0:
                raise DinoscopeError(
                    f"{field} must be >= 0, got {value}",
                    field=field,
                    fix="use a non-negative number of iterations (or epochs)",
                )
        n_cosine = total_iters - warmup_iters - freeze_iters
        if n_cosine < 0:
            raise DinoscopeError(
                f"warmup ({warmup_iters}) plus freeze ({freeze_iters}) iterations exceed total_iters ({total_iters})",
                field="warmup_iters",
                fix="shorten the warmup or freeze period, or train for more epochs",
            )
        self.final_value = final_value
        self.total_iters = total_iters
        steps = np.arange(n_cosine)
        cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(n_cosine, 1)))
        self.schedule: np.ndarray = np.concatenate(
            (np.zeros(freeze_iters), np.linspace(start_warmup_value, base_value, warmup_iters), cosine)
        )

    def __getitem__(self, iteration: int) -> float:
        if iteration < 0:
            raise IndexError(f"schedule iteration must be >= 0, got {iteration}")
        if iteration >= self.total_iters:
            return self.final_value
        return float(self.schedule[iteration])

    def __len__(self) -> int:
        return self.total_iters

    def with_leading_zeros(self, n_iters: int) -> CosineScheduler:
        """A copy whose first ``n_iters`` values are 0 (the rest unchanged), e.g. to freeze the head's last layer."""
        frozen = object.__new__(CosineScheduler)
        frozen.final_value = self.final_value
        frozen.total_iters = self.total_iters
        frozen.schedule = self.schedule.copy()
        frozen.schedule[: max(n_iters, 0)] = 0
        return frozen


@dataclass(frozen=True)
class Schedules:
    """The five per-iteration schedules of a DINOv2 run."""

    lr: CosineScheduler
    wd: CosineScheduler
    momentum: CosineScheduler
    teacher_temp: CosineScheduler
    last_layer_lr: CosineScheduler

    def at(self, iteration: int) -> dict[str, float]:
        """All five values at ``iteration``, keyed by schedule name."""
        return {
            name: getattr(self, name)[iteration] for name in ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr")
        }


def build_schedules(
    *,
    base_lr: float,
    min_lr: float,
    epochs: int,
    warmup_epochs: int,
    epoch_length: int = 1250,
    weight_decay: float = 0.04,
    weight_decay_end: float = 0.4,
    momentum_teacher: float = 0.992,
    final_momentum_teacher: float = 1.0,
    warmup_teacher_temp: float = 0.04,
    teacher_temp: float = 0.07,
    warmup_teacher_temp_epochs: int = 30,
    freeze_last_layer_epochs: int = 1,
) -> Schedules:
    """Build the DINOv2 schedules from plain numbers (``base_lr`` already scaled, see :func:`scaled_lr`).

    * lr: warmup from 0 over ``warmup_epochs``, cosine to ``min_lr`` at ``epochs``.
    * wd and teacher momentum: cosine over the whole run, no warmup.
    * teacher temperature: linear ``warmup_teacher_temp -> teacher_temp`` over ``warmup_teacher_temp_epochs``, then
      constant.
    * last-layer lr: the lr schedule with its first ``freeze_last_layer_epochs`` epochs set to 0.
    """
    total_iters = epochs * epoch_length
    lr = CosineScheduler(base_lr, min_lr, total_iters, warmup_iters=warmup_epochs * epoch_length)
    wd = CosineScheduler(weight_decay, weight_decay_end, total_iters)
    momentum = CosineScheduler(momentum_teacher, final_momentum_teacher, total_iters)
    temp_iters = warmup_teacher_temp_epochs * epoch_length
    temp = CosineScheduler(
        teacher_temp, teacher_temp, temp_iters, warmup_iters=temp_iters, start_warmup_value=warmup_teacher_temp
    )
    last_layer_lr = lr.with_leading_zeros(freeze_last_layer_epochs * epoch_length)
    return Schedules(lr=lr, wd=wd, momentum=momentum, teacher_temp=temp, last_layer_lr=last_layer_lr)


LR_SCALING_RULES: dict[str, Callable[[float, int], float]] = {
    "sqrt_wrt_1024": lambda base_lr, total_batch: base_lr * math.sqrt(total_batch / 1024.0),
    "linear_wrt_256": lambda base_lr, total_batch: base_lr * total_batch / 256.0,
    "none": lambda base_lr, total_batch: base_lr,
}


def scaled_lr(base_lr: float, batch_size_per_rank: int, world_size: int, rule: str = "sqrt_wrt_1024") -> float:
    """Learning rate scaled to the global batch ``batch_size_per_rank * world_size``; never mutates a config.

    ``sqrt_wrt_1024`` (DINOv2 default): ``base_lr * sqrt(global_batch / 1024)``.
    """
    if rule not in LR_SCALING_RULES:
        raise DinoscopeError(
            f"unknown lr scaling rule {rule!r}",
            field="optim.scaling_rule",
            fix=f"use one of: {', '.join(sorted(LR_SCALING_RULES))}",
        )
    if batch_size_per_rank < 1 or world_size < 1:
        raise DinoscopeError(
            f"batch size per rank ({batch_size_per_rank}) and world size ({world_size}) must be >= 1",
            field="batch_size_per_rank",
            fix="set a positive batch size and world size",
        )
    return LR_SCALING_RULES[rule](base_lr, batch_size_per_rank * world_size)
