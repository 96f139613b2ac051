"""DeepSpeed checkpoints of the DeepSpeed strategy: the universal-checkpoint marker, resharding and merging.

* **Resharding.** A checkpoint written at another world size is converted once with DeepSpeed's universal
  checkpoint tool (``deepspeed.checkpoint.ds_to_universal``; Lian et al. 2024, arXiv:2406.18820) into
  ``deepspeed/state_universal`` beside the original shards and loaded with ``checkpoint.load_universal``.
* **Merging.** :func:`consolidate_zero_checkpoint` rebuilds the full fp32 student from the ZeRO shards without a
  process group (DeepSpeed's ``zero_to_fp32``), for export and evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path
from typing import Any

import torch

from core.distributed.deepspeed_backend import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    fp32_state_dict_from_zero_checkpoint,
    run_ds_to_universal,
)
from core.distributed.state_files import DEEPSPEED_TAG
from core.errors import DinoscopeError
from core.io import atomic_path

UNIVERSAL_TAG = f"{DEEPSPEED_TAG}_universal"
# The engine root (deepspeed_strategy._EngineRoot) owns the student as its attribute ``student``.
ENGINE_ROOT_PREFIX = "student."


def universal_client_state() -> dict[str, Any]:
    """Client state to save with the shards: the marker that lets ``ds_to_universal`` reshard them later."""
    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def consolidate_zero_checkpoint(ds_dir: Path, tag: str = DEEPSPEED_TAG) -> dict[str, torch.Tensor]:
    """Full fp32 student state dict merged from the ZeRO shards of a checkpoint (DeepSpeed's zero_to_fp32)."""
    try:
        state = fp32_state_dict_from_zero_checkpoint(ds_dir, tag)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
        raise DinoscopeError(
            f"cannot merge the ZeRO shards ({type(err).__name__}: {err})",
            path=ds_dir,
            fix="pass a complete DeepSpeed checkpoint directory",
        ) from None
    return {k[len(ENGINE_ROOT_PREFIX) :] if k.startswith(ENGINE_ROOT_PREFIX) else k: v for k, v in state.items()}


def convert_to_universal(ds_dir: Path, tag: str = DEEPSPEED_TAG) -> Path:
    """Convert ``ds_dir/tag`` (ZeRO shards of any world size) into ``ds_dir/<tag>_universal``, atomically.

    DeepSpeed's own converter (``deepspeed.checkpoint.ds_to_universal``) writes one folder per parameter holding
    its fp32 value and AdamW moments, which any data-parallel degree can load (arXiv:2406.18820).
    """
    final = Path(ds_dir) / f"{tag}_universal"
    with atomic_path(final, is_dir=True) as tmp:
        args = argparse.Namespace(
            input_folder=str(Path(ds_dir) / tag),
            output_folder=str(tmp),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=False,
        )
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its progress
                run_ds_to_universal(args)
        except Exception as err:
            raise DinoscopeError(
                f"DeepSpeed cannot convert this checkpoint to the universal layout ({type(err).__name__}: {err})",
                path=Path(ds_dir) / tag,
                field="dist",
                fix="resume at the world size the checkpoint was written with",
            ) from None
    return final
