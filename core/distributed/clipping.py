"""Per-sub-module gradient clipping shared by the strategies.

DINOv2 (Oquab et al. 2023, facebookresearch/dinov2 ``train.py``) clips each direct child of the student (backbone,
dino_head, ibot_head...) to ``grad_clip`` on its own, not one global norm.
"""

from __future__ import annotations

import torch
from torch import nn

from core.errors import DinoscopeError


def check_grad_clip(grad_clip: float | None) -> float | None:
    """``grad_clip`` if positive or None (no clipping); raises :class:`~core.errors.DinoscopeError` otherwise."""
    if grad_clip is not None and not grad_clip > 0:
        raise DinoscopeError(
            f"grad_clip must be positive or null, got {grad_clip}",
            field="grad_clip",
            fix="use a positive max norm (DINOv2 uses 3.0) or null to disable clipping",
        )
    return grad_clip


def clip_coefficients(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(1, max_norm / (norm + 1e-6))``: the factor ``torch.nn.utils.clip_grad_norm_`` scales gradients by."""
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


def submodule_parameters(student: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters per direct child of the student: the units that DINOv2 clips separately."""
    groups = {name: [p for p in child.parameters() if p.requires_grad] for name, child in student.named_children()}
    own = [p for p in student.parameters(recurse=False) if p.requires_grad]
    if own:
        groups["_root"] = own
    return {name: params for name, params in groups.items() if params}
