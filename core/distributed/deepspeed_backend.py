"""The only module of the project that imports ``deepspeed``: every DeepSpeed name the project uses comes from here.

``deepspeed`` is optional (``pip install 'dinoscope[dist]'``). Nothing imports this module at package import time:
:func:`core.distributed.strategy.build_strategy` and :mod:`core.train.checkpoint` load the ``deepspeed_*`` modules
that use it on demand.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.checkpoint import ds_to_universal
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_grad, safe_set_local_grad
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

__all__ = [
    "UNIVERSAL_CHECKPOINT_INFO",
    "UNIVERSAL_CHECKPOINT_VERSION_KEY",
    "UNIVERSAL_CHECKPOINT_VERSION_VALUE",
    "DeepSpeedConfig",
    "deepspeed",
    "fp32_state_dict_from_zero_checkpoint",
    "get_accelerator",
    "run_ds_to_universal",
    "safe_get_full_fp32_param",
    "safe_get_local_grad",
    "safe_set_local_grad",
    "skip_shm_comm_op",
]


def skip_shm_comm_op() -> None:
    """Stop DeepSpeed's CPU accelerator JIT-building its shared-memory all-reduce op (35-50 s, inference only).

    ``importlib`` is needed because ``deepspeed.comm`` re-exports ``torch`` under the name ``torch``.
    """
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def fp32_state_dict_from_zero_checkpoint(ds_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """DeepSpeed's ``zero_to_fp32`` merge of the ZeRO shards under ``ds_dir/tag`` (keys of the engine root)."""
    return get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)


def run_ds_to_universal(args: argparse.Namespace) -> None:
    """DeepSpeed's universal-checkpoint converter (``deepspeed.checkpoint.ds_to_universal``) with parsed ``args``."""
    ds_to_universal.main(args)
