"""Device placement in one place: which device a process trains on, and how tensors and modules get there.

Every tensor that reaches a model (training batches, evaluation images, distillation and export inputs) goes
through :func:`place`, and every module through :func:`place_module`, so a run can never silently train on the CPU
while a GPU is idle, and a CPU test can prove (by wrapping :func:`place`) that nothing bypasses it.

Rules (cluster.md, "Devices"):

* ``auto``: ``cuda:LOCAL_RANK`` when CUDA is usable (under torchrun, the DeepSpeed launcher or SLURM the local rank
  selects the GPU; a single process uses ``cuda:0``), otherwise the CPU.
* ``cuda`` means ``cuda:LOCAL_RANK``; ``cuda:N`` is taken literally; ``cpu`` forces the CPU even where CUDA exists.
* Asking for CUDA where there is none, or for a GPU index the node does not have, is a user error that names the
  setting and the fix, never a library traceback.
* Host batches are pinned (``pin_memory``) only when the device is CUDA, and copied with ``non_blocking=True`` so the
  copy overlaps compute; pinning needs a CUDA context, so it is never requested on CPU-only machines.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from core.errors import DinoscopeError

T = TypeVar("T")
_CUDA_RE = re.compile(r"cuda(?::(\d+))?")


def _local_rank() -> int:
    """Local rank from the launcher's environment (torchrun/deepspeed ``LOCAL_RANK``, SLURM ``SLURM_LOCALID``)."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


def resolve_device(
    requested: str = "auto", *, local_rank: int | None = None, field: str = "train.device"
) -> torch.device:
    """The device this process should compute on, for a recipe's ``train.device`` value.

    Args:
        requested: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        local_rank: this process's rank on its node (default: read from the launcher environment).
        field: recipe key named in errors.

    Raises:
        DinoscopeError: for an unknown value, CUDA asked for without CUDA, or a GPU index the node lacks.
    """
    requested = (requested or "auto").strip().lower()
    local_rank = _local_rank() if local_rank is None else int(local_rank)
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        requested = "cuda"
    match = _CUDA_RE.fullmatch(requested)
    if match is None:
        raise DinoscopeError(f"unknown device {requested!r}", field=field, fix="use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DinoscopeError(
            f"device {requested!r} was asked for, but this machine has no usable CUDA device",
            field=field,
            fix=f"use {field}=cpu (or auto), or run on a GPU node with a CUDA build of torch",
        )
    index = int(match.group(1)) if match.group(1) is not None else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        raise DinoscopeError(
            f"GPU {index} was asked for (local rank {local_rank}), but this node has {count}",
            field=field,
            fix="start at most one process per GPU (--nproc_per_node / "
            "--gpus-per-node), or set CUDA_VISIBLE_DEVICES accordingly",
        )
    return torch.device("cuda", index)


def activate(device: torch.device) -> None:
    """Make ``device`` the current CUDA device (before any process group or CUDA tensor exists); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def wants_pinned_memory(device: torch.device, pin_memory: bool | None = None) -> bool:
    """Whether host batches should be pinned: the recipe's choice, by default exactly when training on CUDA."""
    if pin_memory is None:
        return device.type == "cuda"
    return bool(pin_memory) and device.type == "cuda" and torch.cuda.is_available()


def place(obj: T, device: torch.device | str, *, non_blocking: bool = True) -> T:
    """``obj`` with every tensor moved to ``device`` (dicts, lists and tuples are rebuilt; other values kept).

    ``non_blocking`` only has an effect for pinned host tensors going to CUDA; elsewhere the copy is synchronous.
    """
    device = torch.device(device)
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj  # type: ignore[return-value]
        return obj.to(device, non_blocking=non_blocking and device.type == "cuda")  # type: ignore[return-value]
    if isinstance(obj, Mapping):
        return type(obj)((k, place(v, device, non_blocking=non_blocking)) for k, v in obj.items())  # type: ignore
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(place(v, device, non_blocking=non_blocking) for v in obj))  # type: ignore[return-value]
    if isinstance(obj, (list, tuple)):
        return type(obj)(place(v, device, non_blocking=non_blocking) for v in obj)  # type: ignore[return-value]
    return obj


def place_module(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Move a module's parameters and buffers (loss centres included) to ``device``; returns the module."""
    return module.to(torch.device(device))


def module_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer (CPU for an empty module)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def describe(device: torch.device) -> dict[str, Any]:
    """Name, memory and capability of the device, for run_info.json and logs."""
    if device.type != "cuda":
        return {"device": str(device)}
    props = torch.cuda.get_device_properties(device)
    return {
        "device": str(device),
        "name": props.name,
        "memory_gb": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
    }
