"""The resumable, rank-parallel store of ``dinoscope curate embed`` (:mod:`core.curate.embed`).

Items are embedded in chunks of consecutive ids; rank ``r`` of ``W`` takes chunks ``r, r+W, ...``. Each chunk's rows
go to its own file in the rank's part ``RUN/parts/rank-<r>/`` (written atomically), and the chunk is committed by one
line in the part's ``committed.jsonl`` written only after its rows, so a crash costs at most the chunks in flight
and no item is stored twice. When every chunk is committed, rank 0 merges the parts in id order into
``RUN/embeddings.zarr`` (zarr v3, array ``embeddings`` ``[N, D]`` chunked by rows) and ``RUN/ids.parquet`` (a
manifest: id, source, item and, when known, path, window, cell), both renamed into place, and removes the parts.
The layout mirrors the per-field parts of ``dinoscope cells embed``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.curate.collection import require_zarr
from core.data.manifest import write_manifest
from core.errors import DinoscopeError
from core.io import atomic_path, write_json

log = logging.getLogger(__name__)

_CHUNK_BYTES = 8 * 2**20
CONFIG = "embed_config.json"
SUMMARY = "embed_summary.json"
# What a run writes; a run started over removes these (never anything else in the directory).
RUN_FILES = ("embeddings.zarr", "ids.parquet", SUMMARY, CONFIG, "embed_log.jsonl", "parts")
TEXT_COLUMNS = ("path", "window", "cell")


class PartWriter:
    """One rank's part: a rows file per chunk and ``committed.jsonl``, one line per finished chunk."""

    def __init__(self, part_dir: Path) -> None:
        self.dir = part_dir
        part_dir.mkdir(parents=True, exist_ok=True)

    def append(self, chunk: int, rows: dict[str, np.ndarray], seconds: float) -> None:
        """Write chunk ``chunk``'s rows (``embeddings`` and the id and metadata columns), then its commit line."""
        name = f"chunk-{chunk:08d}.npz"
        with atomic_path(self.dir / name) as tmp, tmp.open("wb") as handle:
            np.savez(handle, **rows)
        record = {"chunk": chunk, "rows": name, "n": len(rows["id"]), "seconds": round(seconds, 4)}
        with (self.dir / "committed.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def read_commits(part_dir: Path) -> list[dict[str, Any]]:
    """Commit records of a part; a torn last line (a crash mid-write) and what follows are ignored."""
    path = part_dir / "committed.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def all_commits(run: Path) -> dict[int, tuple[Path, dict[str, Any]]]:
    """Committed chunks of every rank's part: ``{chunk: (part directory, record)}``."""
    found: dict[int, tuple[Path, dict[str, Any]]] = {}
    for part in sorted((run / "parts").glob("rank-*")):
        for record in read_commits(part):
            found.setdefault(int(record["chunk"]), (part, record))
    return found


def plan_run(run: Path, settings: dict[str, Any], *, resume: bool, overwrite: bool) -> str:
    """``complete``, ``resume`` or ``start`` (over) for a run in ``run`` with ``settings``; reads only.

    A run made with other settings is replaced only with ``overwrite`` (or ``resume=False``); otherwise refused, so a
    finished run is never destroyed by a changed flag.
    """
    config = run / CONFIG
    if not config.exists() or not resume:
        return "start"
    previous = json.loads(config.read_text())
    if previous != settings:
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if overwrite:
            log.warning("--overwrite: replacing the run in %s made with other settings (%s)", run, ", ".join(changed))
            return "start"
        raise DinoscopeError(
            f"this directory holds an embedding run made with different settings ({', '.join(changed)})",
            path=run,
            field=changed[0],
            fix="pass --overwrite to replace it, or choose another --out",
        )
    if all((run / name).exists() for name in (SUMMARY, "embeddings.zarr", "ids.parquet")):
        return "complete"
    return "resume"


def start_over(run: Path, settings: dict[str, Any]) -> None:
    """Remove a previous run's files (only those a run writes) and record ``settings``."""
    for name in RUN_FILES:
        target = run / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    write_json(run / CONFIG, settings)


def wait_for_all(run: Path, n_chunks: int, poll_seconds: float, world_size: int) -> dict[int, tuple[Path, dict]]:
    """Poll until all ``n_chunks`` chunks are committed (by any rank); returns the commits.

    A single process embedded every chunk itself, so missing commits raise at once instead of being waited for.
    """
    while len(commits := all_commits(run)) < n_chunks:
        if world_size == 1:
            raise DinoscopeError(
                f"{n_chunks - len(commits)} of {n_chunks} embedded chunks disappeared from {run / 'parts'}",
                path=run,
                fix="make sure nothing else writes to this directory, then run the same command again",
            )
        time.sleep(poll_seconds)
    return commits


def merge_parts(
    run: Path,
    commits: dict[int, tuple[Path, dict[str, Any]]],
    *,
    n_items: int,
    dim: int,
    dtype: str,
    attrs: dict[str, Any],
    sources: list[dict[str, Any]],
) -> None:
    """Concatenate the committed chunks in id order into ``embeddings.zarr`` and ``ids.parquet``."""
    zarr = require_zarr()
    rows_per_chunk = max(64, _CHUNK_BYTES // max(1, dim * np.dtype(dtype).itemsize))
    columns: dict[str, list[np.ndarray]] = {}
    with atomic_path(run / "embeddings.zarr", is_dir=True) as store:
        group = zarr.open_group(store, mode="w", zarr_format=3)
        group.attrs.update(json.loads(json.dumps({**attrs, "n_items": n_items}, default=str)))
        array = group.create_array("embeddings", shape=(n_items, dim), chunks=(rows_per_chunk, dim), dtype=dtype)
        written = 0
        for chunk in sorted(commits):
            part, record = commits[chunk]
            with np.load(part / record["rows"]) as stored:
                rows = {name: stored[name] for name in stored.files}
            n = len(rows["id"])
            if n and rows["id"][0] != written:
                raise DinoscopeError(f"chunk {chunk} starts at id {rows['id'][0]}, expected {written}", path=part)
            array[written : written + n] = rows.pop("embeddings")
            written += n
            for name, values in rows.items():
                columns.setdefault(name, []).append(values)
    if written != n_items:
        raise DinoscopeError(f"the parts hold {written} of {n_items} items", path=run, fix="run the command again")
    table = {name: np.concatenate(parts) for name, parts in columns.items()}
    for name in TEXT_COLUMNS:
        if name in table and not any(table[name]):
            del table[name]  # unknown for every item: no column rather than a column of nulls
    write_manifest(run / "ids.parquet", table, sources=sources, info={"stage": "embed", "n_items": n_items})
