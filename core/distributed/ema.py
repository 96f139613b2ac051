"""Exponential moving average (EMA) teacher update (owned by the distribution layer: every strategy updates the
teacher from full, possibly gathered, student parameters).

DINO / DINOv2 keep a teacher that is never trained directly: after every optimizer step each teacher parameter
becomes ``t <- m * t + (1 - m) * s`` where ``s`` is the matching student parameter and ``m`` the teacher momentum
(Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers", eq. in sec. 3.1; Oquab et al.
2023, DINOv2, ``SSLMetaArch.update_teacher`` in facebookresearch/dinov2). The arithmetic here is the same
``_foreach_mul_`` then ``_foreach_add_(alpha=1-m)`` sequence, so results match the reference bit for bit.

Only parameters are averaged, as in DINOv2: buffers of the teacher are left as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def check_momentum(momentum: float) -> float:
    """``momentum`` as a float; raises ``ValueError`` outside [0, 1]."""
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"teacher momentum must lie in [0, 1], got {momentum}")
    return momentum


@torch.no_grad()
def ema_update_(
    teacher_params: Sequence[torch.Tensor], student_params: Sequence[torch.Tensor], momentum: float
) -> None:
    """In place ``t <- m t + (1 - m) s`` for paired lists of tensors.

    Student tensors of another dtype or device (a bf16 compute copy, a gathered shard) are converted to the
    teacher's first, so the average is always accumulated in the teacher's precision.
    """
    momentum = check_momentum(momentum)
    if len(teacher_params) != len(student_params):
        raise ValueError(f"{len(teacher_params)} teacher tensors but {len(student_params)} student tensors")
    if not teacher_params:
        return
    teacher = [t.data if isinstance(t, nn.Parameter) else t for t in teacher_params]
    student = [
        s.detach().to(dtype=t.dtype, device=t.device).view_as(t) for s, t in zip(student_params, teacher, strict=False)
    ]
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, student, alpha=1.0 - momentum)


def paired_parameters(teacher: nn.Module, student: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Teacher and student parameters matched by name; raises if the two modules differ in structure."""
    teacher_named = dict(teacher.named_parameters())
    student_named = dict(student.named_parameters())
    if teacher_named.keys() != student_named.keys():
        only_t = sorted(teacher_named.keys() - student_named.keys())[:5]
        only_s = sorted(student_named.keys() - teacher_named.keys())[:5]
        raise ValueError(f"teacher and student parameters differ: only in teacher {only_t}, only in student {only_s}")
    names = list(student_named)
    return [teacher_named[n] for n in names], [student_named[n] for n in names]


def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """EMA of full (unsharded) student parameters into the teacher, matched by parameter name.

    Shapes are checked only through ``view_as``; partitioned students (ZeRO-3) must be gathered first, see
    :class:`core.distributed.deepspeed_strategy.DeepSpeedStrategy`.
    """
    teacher_params, student_params = paired_parameters(teacher, student)
    ema_update_(teacher_params, student_params, momentum)
