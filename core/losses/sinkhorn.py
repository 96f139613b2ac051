"""Sinkhorn-Knopp teacher targets and the cross-rank sums the DINO and iBOT losses rely on.

Every reduction across ranks goes through :func:`all_reduce_sum` or :func:`all_reduce_sum_async`. Both are the
identity when ``torch.distributed`` is not initialised, so the losses run unchanged in a single process (the official
iBOT Sinkhorn calls ``dist.all_reduce`` unconditionally and crashes there). Neither helper ever writes into the tensor
it is given: the in-place ``all_reduce`` runs on a private copy.

References:
    Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments" (SwAV),
    arXiv:2006.09882, section 3.1 and appendix A.1 (Sinkhorn-Knopp with a fixed number of iterations).
    Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", arXiv:2304.07193, section 4
    (Sinkhorn-Knopp centering of the teacher), as implemented in facebookresearch/dinov2
    ``dinov2/loss/dino_clstoken_loss.py`` and ``dinov2/loss/ibot_patch_loss.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "PendingSum",
    "all_reduce_sum",
    "all_reduce_sum_async",
    "is_distributed",
    "sinkhorn_knopp",
    "world_size",
]


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is available and initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks in the default process group, 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks; the identity (same object) without a process group.

    The caller's tensor is never modified: the in-place collective runs on a copy.
    """
    if not is_distributed():
        return tensor
    reduced = tensor.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


@dataclass
class PendingSum:
    """A cross-rank sum that may still be in flight; :meth:`result` waits for it."""

    tensor: Tensor
    handle: dist.Work | None = None

    def result(self) -> Tensor:
        """Wait for the collective (if any) and return the summed tensor."""
        if self.handle is not None:
            self.handle.wait()
            self.handle = None
        return self.tensor


def all_reduce_sum_async(tensor: Tensor) -> PendingSum:
    """Start summing ``tensor`` over all ranks without blocking; immediate identity without a process group."""
    if not is_distributed():
        return PendingSum(tensor)
    reduced = tensor.clone()
    handle = dist.all_reduce(reduced, op=dist.ReduceOp.SUM, async_op=True)
    return PendingSum(reduced, handle)


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3, n_samples_total: int | Tensor | None = None
) -> Tensor:
    """Balanced soft assignment of samples to prototypes (SwAV / DINOv2 Sinkhorn-Knopp).

    Rows (samples) may be sharded across ranks: prototype marginals are summed over all ranks, sample marginals are
    local. There is deliberately no max-subtraction before ``exp`` (as in the reference), so results match it exactly;
    keep ``logits / teacher_temp`` in a range where ``exp`` does not overflow in fp32.

    Args:
        teacher_logits: ``[B, K]`` teacher logits of this rank's ``B`` samples over ``K`` prototypes.
        teacher_temp: teacher temperature ``tau_t``.
        n_iterations: number of row/column normalisation rounds.
        n_samples_total: total number of samples over all ranks; defaults to ``B * world_size`` (equal shards).

    Returns:
        ``[B, K]`` float32 targets; each row sums to 1 and each prototype receives ``B_total / K`` mass overall.
    """
    q = torch.exp(teacher_logits.float() / teacher_temp).t()  # K x B
    n_prototypes = q.shape[0]
    if n_samples_total is None:
        n_samples_total = q.shape[1] * world_size()
    total: Tensor | int = n_samples_total
    if isinstance(total, Tensor):
        total = total.to(device=q.device, dtype=q.dtype)
    q = q / all_reduce_sum(q.sum())
    for _ in range(n_iterations):
        q = q / all_reduce_sum(q.sum(dim=1, keepdim=True))
        q = q / n_prototypes
        q = q / q.sum(dim=0, keepdim=True)
        q = q / total
    return (q * total).t()


class LazyCenter:
    """Mixin for losses with a lazily updated EMA centre: ``update_center`` stores a :class:`PendingSum` of
    ``[sum over rows (K values), row count]`` in ``_pending``; the next use folds it into ``center``."""

    center: Tensor
    center_momentum: float
    _pending: PendingSum | None

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Fold a pending update into ``c <- m c + (1 - m) mean(t)``; a no-op when nothing is pending."""
        if self._pending is None:
            return
        summed = self._pending.result()
        self._pending = None
        batch_center = (summed[:-1] / summed[-1]).view_as(self.center)
        self.center.copy_(self.center * self.center_momentum + batch_center * (1 - self.center_momentum))
