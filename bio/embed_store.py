"""The resumable store writer of ``dinoscope cells embed`` (:mod:`bio.embed`).

Rank ``r`` writes each field's rows to its own part ``RUN/parts/rank-<r>/``; a field is committed by one line in
the part's ``committed.jsonl`` written only after its rows, so a field interrupted by a crash is simply redone on
resume and no cell is stored twice. When every field is committed, rank 0 merges the parts in field order into
``RUN/embeddings.zarr`` + ``RUN/cells.parquet`` (atomic renames).
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

from bio.embed_fields import FieldResult
from bio.fields import FieldInfo
from core.errors import DinoscopeError
from core.io import atomic_path, write_json

log = logging.getLogger(__name__)

_CHUNK_BYTES = 8 * 2**20


class PartWriter:
    """One rank's resumable output: a rows file per field and ``committed.jsonl``, one line per finished field.

    A field's rows file is written (atomically) before its commit line, so a crash leaves at worst an uncommitted
    file, which the resumed run simply writes again.
    """

    def __init__(self, part_dir: Path) -> None:
        self.dir = part_dir
        part_dir.mkdir(parents=True, exist_ok=True)
        self.commits = read_commits(part_dir, rewrite=True)
        self.rows = sum(c["n"] for c in self.commits)

    def append(self, field: FieldInfo, result: FieldResult, seconds: float) -> None:
        name = f"field-{field.index:08d}.npz"
        self._write_rows(name, result)
        self._commit(
            {
                "field": field.index,
                "key": field.key,
                "rows": name,
                "n": len(result.cell_id),
                "seconds": round(seconds, 4),
            }
        )
        self.rows += len(result.cell_id)

    def _write_rows(self, name: str, result: FieldResult) -> None:
        arrays = {key: value for key, value in vars(result).items() if value is not None}
        with atomic_path(self.dir / name) as tmp, tmp.open("wb") as handle:
            np.savez(handle, **arrays)

    def _commit(self, record: dict[str, Any]) -> None:
        with (self.dir / "committed.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.commits.append(record)


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
    found: dict[int, tuple[Path, dict[str, Any]]] = {}
    for part in sorted((run / "parts").glob("rank-*")):
        for record in read_commits(part):
            found.setdefault(int(record["field"]), (part, record))
    return found


def prepare_run(run: Path, settings: dict[str, Any], resume: bool, env: Any) -> bool:
    """Check or record the run's settings; True when the run is already complete.

    Under several ranks every rank finishes this step before any starts embedding, so no rank reads commits that
    another is about to discard.
    """
    config = run / "embed_config.json"
    complete = False
    if not resume:
        if env.is_main:
            for stale in ("embeddings.zarr", "cells.parquet", "embed_summary.json", "embed_config.json"):
                target = run / stale
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            for part in (run / "parts").glob("rank-*"):
                if int(part.name.split("-")[1]) >= env.world_size:
                    shutil.rmtree(part)
        shutil.rmtree(run / "parts" / f"rank-{env.rank:04d}", ignore_errors=True)
    elif config.exists():
        previous = json.loads(config.read_text())
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise DinoscopeError(
                f"this run was started with different settings ({', '.join(changed)})",
                path=run,
                field=changed[0],
                fix="use a new output directory, or pass --no-resume to start over",
            )
        complete = (run / "embed_summary.json").exists()
    if not complete:
        run.mkdir(parents=True, exist_ok=True)
        write_json(config, settings)
    if env.world_size > 1:
        start_barrier()
    return complete


def start_barrier() -> None:
    """One barrier over a temporary gloo group; the end of the run is synchronised through files instead,
    because ranks finish far apart and a collective would time out."""
    import torch.distributed as dist

    from core.distributed.env import init_distributed

    created = not (dist.is_available() and dist.is_initialized())
    init_distributed(backend="gloo")
    dist.barrier()
    if created:
        dist.destroy_process_group()


def wait_for_all(run: Path, n_fields: int, poll_seconds: float) -> dict[int, tuple[Path, dict[str, Any]]]:
    while len(commits := all_commits(run)) < n_fields:
        log.debug("waiting for other ranks: %d of %d fields committed", len(commits), n_fields)
        time.sleep(poll_seconds)
    return commits


def merge_parts(
    run: Path,
    fields: list[FieldInfo],
    commits: dict[int, tuple[Path, dict[str, Any]]],
    dim: int,
    dtype: str,
    chunk_rows: int,
    attrs: dict[str, Any],
    head_meta: dict[str, Any] | None,
) -> int:
    """Concatenate the parts in field order into ``embeddings.zarr`` + ``cells.parquet``, writing whole chunks."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zarr

    n_total = sum(commits[f.index][1]["n"] for f in fields)
    rows = chunk_rows or max(64, _CHUNK_BYTES // max(1, dim * np.dtype(dtype).itemsize))
    with atomic_path(run / "embeddings.zarr", is_dir=True) as store, atomic_path(run / "cells.parquet") as table:
        group = zarr.open_group(store, mode="w", zarr_format=3)
        group.attrs.update(json.loads(json.dumps({**attrs, "n_cells": n_total, "n_fields": len(fields)}, default=str)))
        array = group.create_array("embeddings", shape=(n_total, dim), chunks=(rows, dim), dtype=dtype)
        writer = pq.ParquetWriter(table, _cells_schema(head_meta))
        pending: list[dict[str, np.ndarray]] = []
        written = buffered = 0
        for field in [*fields, None]:
            if field is not None:
                part, record = commits[field.index]
                with np.load(part / record["rows"]) as stored:
                    rows_of = {name: stored[name] for name in stored.files}
                for key in ("plate", "well", "site"):
                    rows_of[key] = np.full(record["n"], getattr(field, key), dtype=object)
                pending.append(rows_of)
                buffered += record["n"]
            take = buffered if field is None else (buffered // rows) * rows
            if not take:
                continue
            joined = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
            array[written : written + take] = joined["embeddings"][:take]
            writer.write_table(
                pa.table(_cell_columns({k: v[:take] for k, v in joined.items()}, head_meta), schema=writer.schema)
            )
            pending = [{k: v[take:] for k, v in joined.items()}] if buffered > take else []
            written, buffered = written + take, buffered - take
        writer.close()
    return n_total


def _cells_schema(head_meta: dict[str, Any] | None) -> Any:
    import pyarrow as pa

    columns = [
        ("plate", pa.string()),
        ("well", pa.string()),
        ("site", pa.string()),
        ("cell_id", pa.int64()),
        ("x", pa.float64()),
        ("y", pa.float64()),
        ("edge", pa.bool_()),
    ]
    if head_meta:
        columns.append((f"predicted_{head_meta['label']}", pa.string()))
        columns += [(f"prob_{name}", pa.float32()) for name in head_meta["classes"]]
    return pa.schema(columns)


def _cell_columns(rows: dict[str, np.ndarray], head_meta: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {key: rows[key] for key in ("plate", "well", "site", "cell_id", "x", "y", "edge")}
    if head_meta:
        classes = np.asarray(head_meta["classes"], dtype=object)
        probs = rows["probabilities"]
        out[f"predicted_{head_meta['label']}"] = classes[probs.argmax(axis=1)] if len(probs) else classes[:0]
        out.update({f"prob_{name}": probs[:, k] for k, name in enumerate(head_meta["classes"])})
    return out
