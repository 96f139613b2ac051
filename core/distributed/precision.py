"""Training precision shared by the strategies: the allowed names and the autocast context for each."""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from core.errors import DinoscopeError

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`; raises :class:`~core.errors.DinoscopeError` otherwise."""
    if precision not in PRECISIONS:
        raise DinoscopeError(
            f"unknown precision {precision!r}", field="precision", fix=f"use one of {', '.join(PRECISIONS)}"
        )
    return precision


def autocast_context(precision: str, device_type: str) -> contextlib.AbstractContextManager[None]:
    """``torch.autocast`` for bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=AUTOCAST_DTYPES[precision])
