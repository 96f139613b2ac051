"""Opening a run directory for training: one owner, the recipe it was started with, clean logs, a resume point.

Rank 0 does the file-system work and every rank learns the outcome through one broadcast, so a refusal (the
directory is locked by another run, the recipe changed) stops every rank of the job with the same message at once
instead of leaving the other ranks waiting in a collective:

1. an exclusive lock on the run directory (``core.lock``), held until the run ends; a second process exits at once;
2. temporaries left by a crash are removed (``core.train.run_dir.clean_orphans``);
3. the latest checkpoint is found; its recipe is compared with this one, and a change is refused unless allowed
   (then recorded in ``recipe_changes.jsonl``);
4. ``metrics.jsonl`` and ``eval_knn.jsonl`` lose the lines a crashed run logged after that checkpoint, so a resumed
   run never writes an iteration twice;
5. ``config.yaml`` and ``run_info.json`` are written, only now that the run is known to proceed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

from core.config.commands import ALLOW_CHANGE_ENV
from core.config.loader import to_yaml
from core.distributed.env import DistEnv, get_world_size, has_process_group
from core.errors import DinoscopeError
from core.io import atomic_path
from core.lock import OutputLock
from core.train.checkpoint import find_latest, plain_config, read_client_state
from core.train.run_dir import check_recipe_on_resume, clean_orphans, truncate_jsonl
from core.train.run_info import write_run_info

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval_knn.jsonl"


@dataclasses.dataclass
class ResumePoint:
    """Where training starts.

    Attributes:
        checkpoint: step directory to load, None for a fresh run.
        iteration: completed iterations (0 for a fresh run).
        samples_seen: global sample position of the data stream (all ranks together).
        world_size: world size the checkpoint was written at (None for a fresh run).
    """

    checkpoint: str | None = None
    iteration: int = 0
    samples_seen: int = 0
    world_size: int | None = None

    def resharding(self, world_size: int) -> bool:
        """Whether the checkpoint was written at a world size other than ``world_size``."""
        return self.world_size is not None and self.world_size != world_size


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (identity without a process group)."""
    if not has_process_group() or get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class RunSession:
    """The run directory of one training job: :meth:`open` (collective) before training, :meth:`close` after."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        recipe: Any,
        env: DistEnv,
        *,
        resume: bool = True,
        allow_recipe_change: bool = False,
        recipe_path: str | None = None,
        overrides: list[str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.recipe = recipe
        self.env = env
        self.resume = resume
        self.allow_recipe_change = allow_recipe_change or os.environ.get(ALLOW_CHANGE_ENV) == "1"
        self.recipe_path = recipe_path
        self.overrides = list(overrides or [])
        self._lock: OutputLock | None = None

    def open(self) -> ResumePoint:
        """Collective: rank 0 locks the run directory, removes temporaries, checks the recipe against the resumed run's,
        drops log lines past the checkpoint and writes ``config.yaml``/``run_info.json``; every rank gets the resume
        point, or rank 0's error as a ``DinoscopeError``.
        """
        outcome: dict[str, Any] = {}
        if self.env.is_main:
            try:
                outcome["point"] = dataclasses.asdict(self._open_on_main())
            except DinoscopeError as err:
                outcome["error"] = str(err)
                self.close()
                raise
            finally:
                broadcast_object(outcome)
        else:
            outcome = broadcast_object(outcome)
            if "error" in outcome:
                raise DinoscopeError(f"rank 0 refused the run directory: {outcome['error']}", path=self.run_dir)
        return ResumePoint(**outcome["point"])

    def close(self) -> None:
        """Release the run-directory lock (idempotent)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- rank 0 ----------------------------------------------------------------------------------------------
    def _open_on_main(self) -> ResumePoint:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = OutputLock(self.run_dir, what="run directory", is_dir=True)
        self._lock.acquire()
        removed = clean_orphans(self.run_dir)
        if removed:
            log.info(
                "removed %d temporaries left by an interrupted run: %s",
                len(removed),
                ", ".join(p.name for p in removed),
            )
        latest = find_latest(self.run_dir)
        point = ResumePoint()
        new_config = plain_config(self.recipe)
        if latest is not None and not self.resume:
            raise DinoscopeError(
                f"the run directory already holds checkpoints (latest {latest.name}); starting "
                "over here would mix two runs",
                path=self.run_dir,
                field="--no-resume",
                fix="choose another --output-dir, or delete the run directory first",
            )
        if latest is not None:
            client = read_client_state(latest)
            iteration = int(client["iteration"])
            check_recipe_on_resume(
                self.run_dir,
                client.get("config"),
                new_config,
                allow_change=self.allow_recipe_change,
                iteration=iteration,
            )
            point = ResumePoint(
                checkpoint=str(latest),
                iteration=iteration,
                samples_seen=_samples_seen(client, self.recipe),
                world_size=client.get("world_size"),
            )
        for name in (METRICS_FILE, EVAL_FILE):
            dropped = truncate_jsonl(self.run_dir / name, after_iteration=point.iteration)
            if dropped:
                log.info(
                    "dropped %d lines of %s logged after iteration %d (not in the checkpoint)",
                    dropped,
                    name,
                    point.iteration,
                )
        with atomic_path(self.run_dir / "config.yaml") as tmp:
            tmp.write_text(to_yaml(self.recipe))
        write_run_info(
            self.run_dir,
            self.recipe_path,
            self.overrides,
            world_size=self.env.world_size,
            resumed_from=point.checkpoint,
        )
        return point


def _samples_seen(client: dict[str, Any], recipe: Any) -> int:
    """Global data-stream position of a checkpoint (older checkpoints: iterations x global batch at save time)."""
    sampler = client.get("sampler_state") or {}
    if "samples_seen" in sampler:
        return int(sampler["samples_seen"])
    world = int(client.get("world_size") or 1)
    return int(client["iteration"]) * recipe.train.batch_size_per_rank * world * recipe.dist.grad_accum


def is_main_rank() -> bool:
    """Global rank 0 (or a single process)."""
    return not has_process_group() or dist.get_rank() == 0
