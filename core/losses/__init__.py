"""DINOv2 self-supervised losses: DINO (class token), iBOT (masked patches), KoLeo, and Sinkhorn-Knopp targets.

All cross-rank reductions live in :mod:`core.losses.sinkhorn` and are the identity without a process group.
"""

from __future__ import annotations

from core.losses.dino import DINOLoss
from core.losses.ibot import IBOTPatchLoss, iBOTPatchLoss
from core.losses.koleo import KoLeoLoss
from core.losses.sinkhorn import all_reduce_sum, all_reduce_sum_async, sinkhorn_knopp, world_size

__all__ = [
    "DINOLoss",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "all_reduce_sum",
    "all_reduce_sum_async",
    "iBOTPatchLoss",
    "sinkhorn_knopp",
    "world_size",
]
