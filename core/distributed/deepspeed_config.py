"""The DeepSpeed JSON config of the DeepSpeed strategy: built from typed arguments, then checked offline.

Clipping is per sub-module (:mod:`core.distributed.deepspeed_clipping`), so DeepSpeed's single global
``gradient_clipping`` stays 0. ``bf16`` uses DeepSpeed's ``torch_autocast`` mode, ``fp16`` its native fp16 mode with
dynamic loss scaling. Rare keys go through ``overrides``, deep-merged last.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

from core.distributed.clipping import check_grad_clip
from core.distributed.deepspeed_backend import DeepSpeedConfig
from core.distributed.precision import check_precision
from core.errors import DinoscopeError

ZERO_STAGES = (1, 2, 3)


def build_ds_config(
    *,
    zero_stage: int,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float | None,
    precision: str,
    offload: bool = False,
    reduce_bucket_size: int = 50_000_000,
    allgather_bucket_size: int = 50_000_000,
    overlap_comm: bool | None = None,
    contiguous_gradients: bool = True,
    stage3_prefetch_bucket_size: int = 50_000_000,
    stage3_param_persistence_threshold: int = 100_000,
    stage3_max_live_parameters: int = 1_000_000_000,
    stage3_max_reuse_distance: int = 1_000_000_000,
    load_universal: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The DeepSpeed JSON config for typed arguments; rare keys go through ``overrides`` (deep-merged).

    Raises:
        DinoscopeError: for a stage outside 1-3, a non-positive batch or accumulation, or an unknown precision.
    """
    if zero_stage not in ZERO_STAGES:
        raise DinoscopeError(
            f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage}",
            field="dist.zero_stage",
            fix="use 1 or 2 (recommended) or 3 to also partition the parameters",
        )
    for field, value in (
        ("micro_batch_size", micro_batch_size),
        ("grad_accum", grad_accum),
        ("world_size", world_size),
    ):
        if int(value) < 1:
            raise DinoscopeError(f"{field} must be >= 1, got {value}", field=f"dist.{field}")
    check_precision(precision)
    check_grad_clip(grad_clip)
    zero: dict[str, Any] = {
        "stage": zero_stage,
        "contiguous_gradients": contiguous_gradients,
        "reduce_bucket_size": int(reduce_bucket_size),
        "overlap_comm": zero_stage == 3 if overlap_comm is None else overlap_comm,
    }
    if zero_stage < 3:
        zero["allgather_bucket_size"] = int(allgather_bucket_size)
    else:
        zero.update(
            stage3_prefetch_bucket_size=int(stage3_prefetch_bucket_size),
            stage3_param_persistence_threshold=int(stage3_param_persistence_threshold),
            stage3_max_live_parameters=int(stage3_max_live_parameters),
            stage3_max_reuse_distance=int(stage3_max_reuse_distance),
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(grad_accum),
        "train_batch_size": int(micro_batch_size) * int(grad_accum) * int(world_size),
        # Clipping is per sub-module (DeepSpeedStrategy.clip_and_step), never DeepSpeed's single global norm.
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    if precision == "bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return _deep_merge(config, overrides or {})


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def validate_ds_config(config: Mapping[str, Any]) -> None:
    """Run DeepSpeed's own config parser offline; its errors become a :class:`DinoscopeError`."""
    try:
        DeepSpeedConfig(dict(config))
    except Exception as err:  # DeepSpeed raises AssertionError, pydantic ValidationError, ValueError...
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DinoscopeError(
            f"DeepSpeed rejects the generated config: {first_line}",
            field="dist.deepspeed_overrides",
            fix="check dist.zero_stage, batch sizes and any dist.deepspeed_overrides keys",
        ) from None
