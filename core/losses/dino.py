"""DINO class-token loss: cross-entropy between teacher targets and student predictions over K prototypes.

Shape letters: ``B`` rows (crops x images on this rank), ``K`` prototypes.

References:
    Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO), arXiv:2104.14294, eq. (1)-(4)
    (centering and sharpening of the teacher, EMA center).
    Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", arXiv:2304.07193, section 4
    (image-level objective, Sinkhorn-Knopp centering), reference code facebookresearch/dinov2
    ``dinov2/loss/dino_clstoken_loss.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.losses.sinkhorn import LazyCenter, PendingSum, all_reduce_sum_async, sinkhorn_knopp

__all__ = ["DINOLoss", "cross_entropy_sum"]


def cross_entropy_sum(
    student_outputs: Sequence[Tensor] | Tensor, teacher_targets: Sequence[Tensor] | Tensor, student_temp: float
) -> Tensor:
    """Sum over every (student, teacher) pair of the row-mean cross-entropy ``-sum_k t_k log_softmax(s / T)_k``.

    Each element of either sequence is ``[B, K]`` (a tensor argument is iterated along its first dimension).
    """
    total: Tensor | None = None
    for student in student_outputs:
        log_probs = F.log_softmax(student / student_temp, dim=-1)
        for teacher in teacher_targets:
            term = torch.sum(teacher * log_probs, dim=-1).mean()
            total = -term if total is None else total - term
    if total is None:
        raise ValueError("cross_entropy_sum needs at least one student output and one teacher target")
    return total


class DINOLoss(LazyCenter, nn.Module):
    """DINO loss on the class-token head outputs, with a lazily updated EMA center.

    Args:
        out_dim: number of prototypes ``K``.
        student_temp: student softmax temperature ``tau_s``.
        center_momentum: EMA momentum of the center ``c``.

    The center update is lazy: :meth:`update_center` launches the (async) cross-rank sum and the next
    :meth:`softmax_center_teacher` (or an explicit :meth:`apply_center_update`) folds it in, so step ``s`` is
    centered with teacher outputs up to step ``s - 1`` exactly as in the reference.
    """

    center: Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._pending: PendingSum | None = None

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: Tensor, teacher_temp: float) -> Tensor:
        """``softmax((t - c) / tau_t)``: ``[B, K]`` logits to ``[B, K]`` targets, after any pending center update."""
        self.apply_center_update()
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """Sinkhorn-Knopp targets ``[B, K]`` from ``[B, K]`` logits sharded over ranks; ignores the center."""
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        """Start the center update from ``[B, K]`` teacher logits; applied at the next softmax call.

        Row sum and row count travel in one collective, so ranks with different ``B`` still give the global mean.
        """
        rows = teacher_output.reshape(-1, teacher_output.shape[-1]).float()
        count = torch.full((1,), float(rows.shape[0]), device=rows.device)
        self._pending = all_reduce_sum_async(torch.cat([rows.sum(dim=0), count]))

    def forward(
        self,
        student_output_list: Sequence[Tensor] | Tensor,
        teacher_out_softmaxed_centered_list: Sequence[Tensor] | Tensor,
    ) -> Tensor:
        """Sum over all (student crop, teacher crop) pairs of the mean cross-entropy.

        Args:
            student_output_list: student logits, one ``[B, K]`` tensor per crop group.
            teacher_out_softmaxed_centered_list: teacher targets (probabilities), one ``[B, K]`` tensor per crop.

        Returns:
            Scalar loss (not normalised by the number of pairs; the meta-arch divides by it).
        """
        return cross_entropy_sum(student_output_list, teacher_out_softmaxed_centered_list, self.student_temp)
