"""KoLeo regulariser: Kozachenko-Leonenko differential-entropy estimate that spreads features on the sphere.

Shape letters: ``B`` samples on this rank (one global crop), ``D`` feature dimension.

References:
    Sablayrolles et al., "Spreading vectors for similarity search", arXiv:1806.03198, section 3.2 (the KoLeo
    loss ``-1/n sum_i log(rho_i)`` with ``rho_i`` the distance to the nearest neighbour).
    Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", arXiv:2304.07193, section 4, reference
    code facebookresearch/dinov2 ``dinov2/loss/koleo_loss.py`` (per rank, per global crop, fp32, eps placement).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KoLeoLoss"]

_PAIRWISE_DISTANCE_EPS = 1e-8


class KoLeoLoss(nn.Module):
    """KoLeo loss on one rank's features; it is deliberately not gathered across ranks (as in DINOv2)."""

    def pairwise_NNs_inner(self, x: Tensor) -> Tensor:  # noqa: N802 - the reference method name
        """Nearest neighbour of each row by maximum inner product, itself excluded: ``[B, D]`` to ``[B]`` indices.

        Meant for L2-normalised rows, where the largest inner product is the smallest Euclidean distance.
        """
        dots = x @ x.t()
        # The diagonal is set to -1, the minimum possible inner product of unit vectors, so a row never picks itself.
        dots.fill_diagonal_(-1)
        return torch.argmax(dots, dim=1)

    def forward(self, student_output: Tensor, eps: float = 1e-8) -> Tensor:
        """``-mean_i log(||x_i - x_nn(i) + 1e-8|| + eps)`` on L2-normalised ``[B, D]`` features, ``B >= 2``.

        Computed in fp32 with autocast off. Two identical rows give a finite (large) value thanks to both epsilons.
        """
        if student_output.dim() != 2 or student_output.shape[0] < 2:
            raise ValueError(f"KoLeoLoss needs [B, D] features with B >= 2, got shape {tuple(student_output.shape)}")
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            x = F.normalize(student_output.float(), p=2, dim=-1, eps=eps)
            nearest = self.pairwise_NNs_inner(x)
            distances = F.pairwise_distance(x, x[nearest], p=2, eps=_PAIRWISE_DISTANCE_EPS)
            return -torch.log(distances + eps).mean()
