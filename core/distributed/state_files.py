"""What a strategy writes into a checkpoint directory, and reading it back with clear errors.

The teacher is always a plain, full state dict so that it can be read without DeepSpeed (see
:func:`core.train.checkpoint.consolidated_teacher_state_dict`); the single-process strategy also writes the student
and the optimizer as plain files, the DeepSpeed strategy its ZeRO shards under ``deepspeed/state``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import DinoscopeError

TEACHER_FILE = "teacher.pt"
STUDENT_FILE = "student.pt"
OPTIMIZER_FILE = "optimizer.pt"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of ``module.state_dict()`` (safe to save while training goes on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def load_torch_file(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` with a clear error for a missing or unreadable checkpoint file."""
    if not path.is_file():
        raise DinoscopeError(
            f"the {what} file of this checkpoint is missing",
            path=path,
            fix="resume from a complete checkpoint directory (see the `latest` pointer)",
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for truncated or foreign files
        raise DinoscopeError(
            f"cannot read the {what} file ({type(err).__name__}: {err})",
            path=path,
            fix="the file is damaged or not a dinoscope checkpoint; resume from an older step",
        ) from None


def load_module_state(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    """Strict ``load_state_dict``; missing, unexpected or mis-shaped keys raise a ``DinoscopeError`` naming ``what``."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DinoscopeError(
            f"the {what} in this checkpoint does not match the model ({err})",
            path=path,
            field=what,
            fix="resume with the same model configuration the checkpoint was made with",
        ) from None
