"""iBOT masked-patch loss: the student predicts, at masked patches, the teacher's targets for the unmasked view.

Shape letters: ``B`` global crops on this rank, ``N`` patches per crop, ``M`` masked patches on this rank (rows in
the row-major order of ``student_masks_flat``), ``K`` prototypes.

References:
    Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", arXiv:2111.07832, eq. (2) (masked image
    modeling loss on patch tokens, centered and sharpened teacher).
    Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", arXiv:2304.07193, section 4
    (patch-level objective, Sinkhorn-Knopp centering), reference code facebookresearch/dinov2
    ``dinov2/loss/ibot_patch_loss.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.losses.sinkhorn import LazyCenter, PendingSum, all_reduce_sum, all_reduce_sum_async, sinkhorn_knopp

__all__ = ["IBOTPatchLoss", "iBOTPatchLoss"]


def _patch_cross_entropy(student: Tensor, teacher: Tensor, student_temp: float) -> Tensor:
    """``sum_k t_k log_softmax(s / T)_k`` per patch: ``[..., K]`` to ``[...]`` (a log-likelihood, not negated)."""
    return torch.sum(teacher * F.log_softmax(student / student_temp, dim=-1), dim=-1)


class iBOTPatchLoss(LazyCenter, nn.Module):  # noqa: N801 - the reference name, kept for familiarity; alias IBOTPatchLoss below
    """iBOT patch loss with a lazily updated EMA center of shape ``[1, 1, K]``.

    Args:
        patch_out_dim: number of prototypes ``K`` of the iBOT head.
        student_temp: student softmax temperature ``tau_s``.
        center_momentum: EMA momentum of the center ``c``.

    The center update averages per-image patch means (the reference feeds ``[1, M, K]``, so it is the average of
    per-rank means); it is lazy like :class:`core.losses.DINOLoss`.
    """

    center: Tensor

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.patch_out_dim = patch_out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))
        self._pending: PendingSum | None = None

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: Tensor, teacher_temp: float) -> Tensor:
        """``softmax((t - c) / tau_t)`` on ``[..., K]`` logits (``[1, M, K]`` or ``[B, N, K]``), same shape out."""
        self.apply_center_update()
        return F.softmax((teacher_patch_tokens - self.center.view(-1)) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_output: Tensor, teacher_temp: float, n_masked_patches_tensor: Tensor, n_iterations: int = 3
    ) -> Tensor:
        """Sinkhorn-Knopp targets ``[M, K]`` from ``[M, K]`` masked-patch logits; ignores the center.

        ``n_masked_patches_tensor`` holds this rank's ``M``; it is summed over ranks (on a copy, the caller's tensor
        is left untouched) to get the total number of samples.
        """
        n_total = all_reduce_sum(n_masked_patches_tensor)
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=n_iterations, n_samples_total=n_total)

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: Tensor) -> None:
        """Start the center update from ``[B, N, K]`` (or ``[M, K]``, one group) teacher logits.

        The batch center is the mean over groups (and ranks) of each group's patch mean.
        """
        tokens = teacher_patch_tokens.float()
        if tokens.dim() == 2:
            tokens = tokens.unsqueeze(0)
        group_means = tokens.mean(dim=1).reshape(-1, tokens.shape[-1])  # B x K
        count = torch.full((1,), float(group_means.shape[0]), device=tokens.device)
        self._pending = all_reduce_sum_async(torch.cat([group_means.sum(dim=0), count]))

    def forward(self, student_patch_tokens: Tensor, teacher_patch_tokens: Tensor, student_masks_flat: Tensor) -> Tensor:
        """Dense variant: mean over crops of the mean cross-entropy over that crop's masked patches.

        Args:
            student_patch_tokens: ``[B, N, K]`` student logits.
            teacher_patch_tokens: ``[B, N, K]`` teacher targets (probabilities).
            student_masks_flat: ``[B, N]`` bool, True where the student's patch was masked.

        Returns:
            Scalar loss; crops without masked patches contribute 0 but still count in the mean.
        """
        per_patch = _patch_cross_entropy(student_patch_tokens, teacher_patch_tokens, self.student_temp)
        masks = student_masks_flat.to(per_patch.dtype)
        per_crop = torch.sum(per_patch * masks, dim=-1) / masks.sum(dim=-1).clamp(min=1.0)
        return -per_crop.mean()

    def forward_masked(
        self,
        student_patch_tokens_masked: Tensor,
        teacher_patch_tokens_masked: Tensor,
        student_masks_flat: Tensor,
        n_masked_patches: int | Tensor | None = None,
        masks_weight: Tensor | None = None,
    ) -> Tensor:
        """Masked-only variant used in training; equals :meth:`forward` without materialising ``[B, N, K]``.

        Args:
            student_patch_tokens_masked: ``[M', K]`` student logits at masked patches (``M' >= M`` if padded).
            teacher_patch_tokens_masked: ``[M', K]`` teacher targets at the same patches.
            student_masks_flat: ``[B, N]`` bool masks of all global crops on this rank.
            n_masked_patches: ``M``; rows past it (padding) are dropped. Defaults to all rows.
            masks_weight: ``[M]`` weight per masked patch; defaults to ``1 / (masked patches in its crop)``.

        Returns:
            Scalar ``-sum_p w_p ce_p / B``: ``B`` counts every global crop, masked or not.
        """
        per_patch = _patch_cross_entropy(student_patch_tokens_masked, teacher_patch_tokens_masked, self.student_temp)
        if masks_weight is None:
            per_crop_weight = 1 / student_masks_flat.sum(dim=-1).clamp(min=1.0)
            masks_weight = per_crop_weight.unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        if n_masked_patches is not None:
            per_patch = per_patch[: int(n_masked_patches)]
        return -torch.sum(per_patch * masks_weight) / student_masks_flat.shape[0]


IBOTPatchLoss = iBOTPatchLoss
