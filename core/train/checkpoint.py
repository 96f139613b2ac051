"""Resumable training-state checkpoints: atomic per-step directories, a ``latest`` pointer and retention.

Layout of a run directory::

    RUN/checkpoints/
        latest                      text: name of the newest complete step directory (written last)
        step_00001250/
            client_state.pt         iteration, format_version, strategy kind, config (+ hash), git sha,
                                    loss-centre buffers, data-sampler position, extra
            rng_rank00000.pt ...    python / numpy / torch (/ cuda) RNG states, one file per rank
            teacher.pt              full fp32 teacher state dict (always plain, readable without DeepSpeed)
            student.pt, optimizer.pt          single-process strategy
            deepspeed/state/...               DeepSpeed strategy: ZeRO shards from engine.save_checkpoint

A step directory is written under a hidden temporary name and renamed when every rank has finished, so a crash
never leaves a half-written ``step_*`` directory; ``latest`` is replaced (atomically) only after the rename.
Retention keeps the last ``keep`` checkpoints plus every one whose iteration is a multiple of ``keep_every``.
Layout after dinov3's checkpointer and mmengine's ``DeepSpeedStrategy.save_checkpoint`` (style.md §6.4).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from core.distributed.env import barrier, get_rank, get_world_size, has_process_group
from core.distributed.state_files import DEEPSPEED_DIR, DEEPSPEED_TAG, STUDENT_FILE, TEACHER_FILE, load_torch_file
from core.distributed.strategy import Strategy
from core.errors import DinoscopeError
from core.io import atomic_path

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
CLIENT_STATE_FILE = "client_state.pt"
_STEP_RE = re.compile(r"step_(\d{8,})")


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    """``RUN/checkpoints``."""
    return Path(run_dir) / CHECKPOINTS_DIR


def step_dir(run_dir: str | os.PathLike, iteration: int) -> Path:
    """``RUN/checkpoints/step_{iteration:08d}``."""
    return checkpoints_dir(run_dir) / f"step_{int(iteration):08d}"


def rng_file(rank: int) -> str:
    """File name of one rank's RNG states in a step directory (``rng_rank00003.pt``)."""
    return f"rng_rank{rank:05d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete step directories of a run as ``(iteration, path)``, oldest first (temporaries are hidden)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.fullmatch(p.name))]
    return sorted(found)


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """The step directory named by ``latest``; the newest step directory if the pointer is missing or stale."""
    root = checkpoints_dir(run_dir)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text().strip()
        if _STEP_RE.fullmatch(name) and (root / name).is_dir():
            return root / name
        log.warning("%s names %r, which is not a complete checkpoint; using the newest step directory", pointer, name)
    steps = list_checkpoints(run_dir)
    return steps[-1][1] if steps else None


# ---------------------------------------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA) generator states in a form ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the python, numpy, torch (and, when present and usable, CUDA) RNG states of
    :func:`capture_rng_state`.
    """
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------- save
def plain_config(config: Any) -> Any:
    """A JSON-compatible copy of a dataclass, OmegaConf or mapping config (None stays None)."""
    if config is None:
        return None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    elif type(config).__module__.startswith("omegaconf"):
        config = OmegaConf.to_container(config, resolve=True)
    return json.loads(json.dumps(config, default=str))


def config_hash(config: Any) -> str | None:
    """First 16 hex digits of the SHA-256 of the config's sorted-key JSON; None for None."""
    if config is None:
        return None
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def save_training_state(
    run_dir: str | os.PathLike,
    iteration: int,
    strategy: Strategy,
    *,
    loss_state: Mapping[str, torch.Tensor] | None = None,
    config: Any = None,
    sampler_state: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    git_sha: str | None = None,
    keep: int | None = 3,
    keep_every: int | None = None,
) -> Path:
    """Write ``RUN/checkpoints/step_{iteration:08d}/`` atomically, move ``latest`` to it, apply retention.

    Collective: every rank calls it (each writes its shards and RNG state). Returns the step directory.

    Args:
        run_dir: the run's output directory.
        iteration: number of completed iterations; a resumed run starts at this iteration.
        strategy: writes model and optimizer state (:meth:`Strategy.save`).
        loss_state: loss-centre buffers (DINO/iBOT centres) to restore on resume.
        config: the resolved run config (dataclass, OmegaConf or mapping), stored with its hash.
        sampler_state: data-sampler position, e.g. ``{"start_iteration": ...}``.
        extra: any other small JSON-like values to carry along.
        git_sha: code version that produced the checkpoint.
        keep: number of most recent checkpoints to keep (None keeps all).
        keep_every: also keep every checkpoint whose iteration is a multiple of this.
    """
    _check_retention(keep, keep_every)
    plain = plain_config(config)
    client_state = {
        "format_version": FORMAT_VERSION,
        "iteration": int(iteration),
        "strategy": strategy.kind,
        "world_size": get_world_size(),
        "config": plain,
        "config_hash": config_hash(plain),
        "git_sha": git_sha,
        "loss_state": {k: v.detach().cpu().clone() for k, v in (loss_state or {}).items()},
        "sampler_state": dict(sampler_state or {}),
        "extra": dict(extra or {}),
        "time": time.time(),
    }
    final = step_dir(run_dir, iteration)
    rank = get_rank()
    if rank == 0:
        with atomic_path(final, is_dir=True) as tmp:
            _share_path(tmp)
            _write_step_contents(tmp, strategy, client_state, rank)
            barrier()  # every rank has finished writing into tmp before it is renamed
        with atomic_path(checkpoints_dir(run_dir) / LATEST_FILE) as pointer:
            pointer.write_text(final.name + "\n")
    else:
        tmp = _share_path(None)
        _write_step_contents(tmp, strategy, client_state, rank)
        barrier()
    barrier()
    if rank == 0:
        deleted = apply_retention(run_dir, keep=keep, keep_every=keep_every)
        log.info("saved %s%s", final, f"; removed {[p.name for p in deleted]}" if deleted else "")
    return final


def _share_path(path: Path | None) -> Path:
    """Rank 0's temporary directory name, sent to every other rank."""
    if not has_process_group() or get_world_size() == 1:
        assert path is not None
        return path
    box = [str(path) if path is not None else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _write_step_contents(directory: Path, strategy: Strategy, client_state: dict[str, Any], rank: int) -> None:
    strategy.save(directory)
    torch.save(capture_rng_state(), directory / rng_file(rank))
    if rank == 0:
        torch.save(client_state, directory / CLIENT_STATE_FILE)


def _check_retention(keep: int | None, keep_every: int | None) -> None:
    if keep is not None and keep < 1:
        raise DinoscopeError(
            f"keep must be at least 1 (or null to keep everything), got {keep}",
            field="train.keep_checkpoints",
            fix="set a positive number of checkpoints to keep",
        )
    if keep_every is not None and keep_every < 1:
        raise DinoscopeError(f"keep_every must be positive or null, got {keep_every}", field="keep_every")


def apply_retention(run_dir: str | os.PathLike, *, keep: int | None, keep_every: int | None = None) -> list[Path]:
    """Delete step directories that are neither among the last ``keep`` nor a multiple of ``keep_every``."""
    _check_retention(keep, keep_every)
    if keep is None:
        return []
    steps = list_checkpoints(run_dir)
    latest = find_latest(run_dir)
    recent = {path for _, path in steps[-keep:]}
    deleted = []
    for iteration, path in steps:
        if path in recent or path == latest or (keep_every and iteration % keep_every == 0):
            continue
        shutil.rmtree(path)
        deleted.append(path)
    return deleted


# ---------------------------------------------------------------------------------------------------- load
def _resolve_step_dir(path: str | os.PathLike) -> Path:
    """Accept a step directory or a run directory (then its latest checkpoint)."""
    path = Path(path)
    if (path / CLIENT_STATE_FILE).is_file() or _STEP_RE.fullmatch(path.name):
        return path
    latest = find_latest(path)
    if latest is None:
        raise DinoscopeError(
            "no training checkpoint found",
            path=path,
            fix="pass a run directory with checkpoints/step_* or a step directory",
        )
    return latest


def load_training_state(ckpt_dir: str | os.PathLike, strategy: Strategy) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG state; return the client state.

    Collective. ``ckpt_dir`` is a step directory (or a run directory, meaning its latest checkpoint). The returned
    dict holds ``iteration``, ``format_version``, ``strategy``, ``world_size``, ``config``, ``config_hash``,
    ``git_sha``, ``loss_state``, ``sampler_state``, ``extra`` and ``path``.
    """
    directory = _resolve_step_dir(ckpt_dir)
    if not directory.is_dir():
        raise DinoscopeError(
            "the checkpoint directory does not exist",
            path=directory,
            fix="check the path, or resume from the run directory to use the latest checkpoint",
        )
    client = read_client_state(directory)
    if client.get("strategy") != strategy.kind:
        raise DinoscopeError(
            f"the checkpoint was written by strategy {client.get('strategy')!r} but this run uses {strategy.kind!r}",
            path=directory,
            field="dist.strategy",
            fix=f"resume with dist.strategy={client.get('strategy')}",
        )
    saved_world = client.get("world_size")
    strategy.load(directory, saved_world_size=saved_world)
    rng_path = directory / rng_file(get_rank())
    if saved_world == get_world_size() and rng_path.is_file():
        restore_rng_state(load_torch_file(rng_path, "RNG state"))
    else:
        # Per-rank streams of another world size do not map onto this one: derive them from (seed, rank,
        # iteration) so that a resharded resume is still deterministic (cluster.md, "Resuming at another world size").
        seed = int(((client.get("config") or {}).get("train") or {}).get("seed", 0))
        derive_rng_state(seed, get_rank(), int(client["iteration"]))
        log.info(
            "derived RNG streams for rank %d from (seed, rank, iteration): checkpoint world size %s, now %d",
            get_rank(),
            saved_world,
            get_world_size(),
        )
    barrier()
    return {**client, "path": str(directory)}


def read_client_state(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The small client state of a checkpoint (iteration, world size, config...) without loading any weights."""
    directory = _resolve_step_dir(ckpt_dir)
    client = load_torch_file(directory / CLIENT_STATE_FILE, "client state")
    version = int(client.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise DinoscopeError(
            f"checkpoint format_version {version} is newer than this dinoscope supports ({FORMAT_VERSION})",
            path=directory / CLIENT_STATE_FILE,
            field="format_version",
            fix="upgrade dinoscope",
        )
    return client


def derive_rng_state(seed: int, rank: int, iteration: int) -> None:
    """Seed python, numpy and torch (and CUDA) from ``(seed, rank, iteration)`` alone."""
    entropy = np.random.SeedSequence([int(seed), int(rank), int(iteration)]).generate_state(2)
    value = int(entropy[0]) << 32 | int(entropy[1])
    random.seed(value)
    np.random.seed(int(entropy[0]))
    torch.manual_seed(value)


def consolidated_teacher_state_dict(ckpt_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full fp32 teacher of a checkpoint (step or run directory), for export; never needs DeepSpeed.

    Both strategies store the teacher as a plain full state dict (under ZeRO it is not sharded), so this works for
    sharded checkpoints too.
    """
    directory = _resolve_step_dir(ckpt_dir)
    return load_torch_file(directory / TEACHER_FILE, "teacher")


def consolidated_student_state_dict(ckpt_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full fp32 student of a checkpoint: ``student.pt``, or ZeRO shards merged with DeepSpeed's zero_to_fp32."""
    directory = _resolve_step_dir(ckpt_dir)
    if (directory / STUDENT_FILE).is_file():
        return load_torch_file(directory / STUDENT_FILE, "student")
    if not (directory / DEEPSPEED_DIR).is_dir():
        raise DinoscopeError(
            "the checkpoint holds no student state", path=directory, fix="pass a complete step directory"
        )
    try:
        # deferred: optional extra [dist] (deepspeed), only for ZeRO checkpoints
        ds_module = importlib.import_module("core.distributed.deepspeed_checkpoint")
    except ImportError as err:
        raise DinoscopeError(
            f"merging ZeRO shards needs deepspeed ({err})",
            path=directory / DEEPSPEED_DIR,
            fix="pip install 'dinoscope[dist]'",
        ) from None
    return ds_module.consolidate_zero_checkpoint(directory / DEEPSPEED_DIR, DEEPSPEED_TAG)
