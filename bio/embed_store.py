"""The resumable store writer of ``dinoscope cells embed`` (:mod:`bio.embed`).

Rank ``r`` writes each field's rows to its own part ``RUN/parts/rank-<r>/``; a field is committed by one line in
the part's ``committed.jsonl`` written only after its rows, so a field interrupted by a crash is simply redone on
resume and no cell is stored twice. When every field is committed, rank 0 merges the parts in field order into
``RUN/embeddings.zarr`` + ``RUN/cells.parquet`` (:mod:`bio.embed_merge`).

Start of a run (:func:`start_run`): each process locks the run directory, so a second run on the same directory
fails at once naming the first, instead of interleaving parts with it (or waiting forever for fields the first run
already merged away). Rank 0 (and a single process) takes ``RUN/.dinoscope.lock``, the lock every dinoscope output
uses; rank ``r > 0`` takes ``RUN/.rank-<r>.lock``: the ranks of one job never contend with each other, while each
rank of a second job meets its counterpart's lock. Under several ranks the lock results, and the settings check, are
agreed over a temporary gloo group before anything is changed, so every rank of a refused job stops with the
others and none waits forever in a barrier.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from bio.embed_fields import FieldResult
from bio.fields import FieldInfo
from bio.qc import focus_score
from core.distributed.env import init_distributed
from core.errors import DinoscopeError
from core.io import atomic_path, write_json
from core.lock import OutputLock

log = logging.getLogger(__name__)

ROWS_SUFFIX = ".rows"
# What a run writes besides the parts; a run started over removes them (never anything else in the directory).
RUN_FILES = (
    "embeddings.zarr",
    "cells.parquet",
    "cells.h5ad",
    "embed_summary.json",
    "embed_config.json",
    "embed_log.jsonl",
)


class PartWriter:
    """One rank's resumable output: a rows file per field and ``committed.jsonl``, one line per finished field.

    A field's rows file is written (atomically) before its commit line, so a crash leaves at worst an uncommitted
    file, which the resumed run simply writes again. The QC values the merge needs first (:attr:`measured`: focus
    and nucleus area of each field written here) are also kept in memory, a few bytes per cell, so the merge does
    not read every rows file twice.
    """

    def __init__(self, part_dir: Path) -> None:
        self.dir = part_dir
        part_dir.mkdir(parents=True, exist_ok=True)
        self.commits = read_commits(part_dir, rewrite=True)
        self.rows = sum(c["n"] for c in self.commits)
        self.measured: dict[int, dict[str, np.ndarray]] = {}

    def append(self, field: FieldInfo, result: FieldResult, seconds: float, found: int | None = None) -> None:
        """Write ``field``'s rows (``field-<index>.rows``) and then its commit line; ``seconds`` is logged and
        ``found`` (nuclei found, before ``edge="skip"`` dropped any) recorded to explain a run without cells."""
        name = f"field-{field.index:08d}{ROWS_SUFFIX}"
        self._write_rows(name, result)
        n = len(result.cell_id)
        self._commit(
            {
                "field": field.index,
                "key": field.key,
                "rows": name,
                "n": n,
                "found": n if found is None else int(found),
                "seconds": round(seconds, 4),
            }
        )
        self.rows += len(result.cell_id)
        self.measured[field.index] = merge_inputs(vars(result))

    def _write_rows(self, name: str, result: FieldResult) -> None:
        """One JSON line naming each column's dtype and shape, then the columns' bytes back to back: written and read
        in one call each, an order of magnitude cheaper than a zip of ``.npy`` members for a field's few rows."""
        arrays = {key: np.ascontiguousarray(value) for key, value in vars(result).items() if value is not None}
        layout = {key: [value.dtype.str, list(value.shape)] for key, value in arrays.items()}
        with atomic_path(self.dir / name) as tmp, tmp.open("wb") as handle:
            handle.write(json.dumps(layout).encode() + b"\n")
            for value in arrays.values():
                handle.write(value.data if value.size else b"")

    def _commit(self, record: dict[str, Any]) -> None:
        with (self.dir / "committed.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.commits.append(record)


def read_rows(part: Path, record: dict[str, Any]) -> dict[str, np.ndarray]:
    """The columns of a committed field's rows file (read-only arrays); ``.npz`` parts of earlier versions too."""
    path = part / record["rows"]
    if path.suffix == ".npz":
        with np.load(path) as stored:
            return {name: stored[name] for name in stored.files}
    raw = path.read_bytes()
    end = raw.index(b"\n")
    columns, offset = {}, end + 1
    for name, (dtype, shape) in json.loads(raw[:end]).items():
        dtype, count = np.dtype(dtype), math.prod(shape)
        columns[name] = np.frombuffer(raw, dtype, count, offset).reshape(shape)
        offset += count * dtype.itemsize
    return columns


def merge_inputs(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the merge reads of every field before it writes anything: the values of its plate's QC medians."""
    return {"focus_score": focus_score(rows["focus"]), "nucleus_area": np.array(rows["nucleus_area"])}


def read_commits(part_dir: Path, *, rewrite: bool = False) -> list[dict[str, Any]]:
    """Commit records of a part; a torn last line (crash mid-write) is ignored, and removed with ``rewrite``."""
    path = part_dir / "committed.jsonl"
    if not path.exists():
        return []
    records, lines = [], path.read_text().splitlines()
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    if rewrite and len(records) != len(lines):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def all_commits(run: Path) -> dict[int, tuple[Path, dict[str, Any]]]:
    """Committed fields of every rank's part: ``{field index: (part directory, commit record)}``."""
    found: dict[int, tuple[Path, dict[str, Any]]] = {}
    for part in sorted((run / "parts").glob("rank-*")):
        for record in read_commits(part):
            found.setdefault(int(record["field"]), (part, record))
    return found


def run_lock(run: Path, rank: int) -> OutputLock:
    """The lock this rank holds on ``run`` for the whole run (see the module docstring)."""
    if rank == 0:
        return OutputLock(run, what="embedding run", is_dir=True)
    return OutputLock(run / f"rank-{rank:04d}", what=f"embedding run (rank {rank})", is_dir=False)


class RankSync:
    """The two start-of-run synchronisation points of a multi-rank run, over one temporary gloo group (a no-op for
    one process). The end of the run is synchronised through files instead, because ranks finish far apart and a
    collective would time out."""

    def __init__(self, world_size: int) -> None:
        self.active = world_size > 1
        self.created = False

    def agree(self, ok: bool) -> bool:
        """Whether every rank is ``ok``; also a barrier."""
        if not self.active:
            return ok
        if not (dist.is_available() and dist.is_initialized()):
            init_distributed(backend="gloo")
            self.created = True
        flag = torch.tensor([int(ok)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def close(self) -> None:
        """Leave the group if this object created it."""
        if self.created:
            dist.destroy_process_group()
            self.created = False


def start_run(
    run: Path, settings: dict[str, Any], env: Any, lock: OutputLock, *, resume: bool, overwrite: bool
) -> bool:
    """Lock ``run`` (unless ``lock`` is held already), check the settings of a previous run there, start over or
    resume; True when the run is already complete.

    Every rank decides from the directory as it was (nothing changes before all ranks agree), and finishes its
    clean-up before any rank reads commits (another agreement), so no rank reads commits that another discards.
    """
    sync = RankSync(env.world_size)
    try:
        failure: BaseException | None = None
        try:
            if lock.info is None:  # not taken yet (DINOSCOPE_NO_LOCK leaves info set but nothing held)
                lock.acquire()
            action = plan_run(run, settings, resume=resume, overwrite=overwrite)
        except DinoscopeError as err:
            failure = err
        if not sync.agree(failure is None):
            raise failure or DinoscopeError("another rank of this job could not start; see its message", path=run)
        try:
            if action == "start":
                _start_over(run, settings, env)
        except Exception as err:
            failure = err
        if not sync.agree(failure is None):
            raise failure or DinoscopeError("another rank of this job could not start; see its message", path=run)
    finally:
        sync.close()
    return action == "complete"


def plan_run(run: Path, settings: dict[str, Any], *, resume: bool, overwrite: bool) -> str:
    """``"complete"``, ``"resume"`` or ``"start"`` (over) for a run in ``run`` with ``settings``; reads only.

    A run made with other settings is replaced only with ``overwrite`` (or ``resume=False``, which always starts
    over); otherwise it is refused, so a finished run is never destroyed by a changed flag. An earlier attempt that
    embedded no cell at all is not protected: a corrected command simply starts over.
    """
    config = run / "embed_config.json"
    if not config.exists():
        return "start"
    if not resume:
        log.info("--no-resume: starting %s over", run)
        return "start"
    try:
        previous = json.loads(config.read_text())
    except ValueError:
        previous = {"embed_config.json": "unreadable"}
    if previous != settings and nothing_kept(run):
        log.info("%s: the earlier attempt there embedded no cell; starting over with the new settings", run)
        return "start"
    if previous != settings:
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        details = "; ".join(
            f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}"
            for k in changed
            if len(repr(previous.get(k))) + len(repr(settings.get(k))) < 120
        )
        if overwrite:
            log.warning("--overwrite: replacing the run in %s, made with other settings (%s)", run, ", ".join(changed))
            return "start"
        raise DinoscopeError(
            f"this directory holds an embedding run made with different settings ({', '.join(changed)})"
            + (f": {details}" if details else ""),
            path=run,
            field=changed[0],
            fix="pass --overwrite to replace it, or choose another --out",
        )
    if all((run / name).exists() for name in ("embed_summary.json", "embeddings.zarr", "cells.parquet")):
        return "complete"
    if (run / "embed_summary.json").exists():
        log.warning("%s says it is complete but its store is missing: embedding it again", run)
        return "start"
    return "resume"


def nothing_kept(run: Path) -> bool:
    """Whether ``run`` holds no embedded cell: no final store, and no committed field with a cell."""
    if (run / "embeddings.zarr").exists() or (run / "cells.parquet").exists():
        return False
    return not any(int(record.get("n", 0)) for _, record in all_commits(run).values())


def discard_attempt(run: Path) -> None:
    """Remove the state of an attempt that embedded nothing (its parts and settings), so that nothing of it blocks
    or is resumed by the next command; its log stays, to show what was tried."""
    shutil.rmtree(run / "parts", ignore_errors=True)
    (run / "embed_config.json").unlink(missing_ok=True)


def _start_over(run: Path, settings: dict[str, Any], env: Any) -> None:
    """Remove this rank's part (rank 0: also the store and parts of ranks beyond the world size); record settings."""
    if env.is_main:
        for name in RUN_FILES:
            target = run / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        for part in (run / "parts").glob("rank-*"):
            if int(part.name.split("-")[1]) >= env.world_size:
                shutil.rmtree(part)
    shutil.rmtree(run / "parts" / f"rank-{env.rank:04d}", ignore_errors=True)
    if env.is_main:
        run.mkdir(parents=True, exist_ok=True)
        write_json(run / "embed_config.json", settings)


def wait_for_all(
    run: Path, n_fields: int, poll_seconds: float, world_size: int = 1
) -> dict[int, tuple[Path, dict[str, Any]]]:
    """Poll every ``poll_seconds`` until all ``n_fields`` fields are committed (by any rank); returns the commits.

    A single process has embedded every field itself, so missing commits (parts removed by someone else while it
    ran) raise at once instead of being waited for forever.
    """
    while len(commits := all_commits(run)) < n_fields:
        if world_size == 1:
            raise DinoscopeError(
                f"{n_fields - len(commits)} of {n_fields} embedded fields disappeared from {run / 'parts'} while "
                "this run was writing them",
                path=run,
                fix="make sure nothing else writes to or cleans this directory, then run the same command again",
            )
        log.debug("waiting for other ranks: %d of %d fields committed", len(commits), n_fields)
        time.sleep(poll_seconds)
    return commits
