"""The merge of ``dinoscope cells embed`` (:mod:`bio.embed`): once every field is committed, rank 0 concatenates
the parts (:mod:`bio.embed_store`) in field order into ``RUN/embeddings.zarr`` + ``RUN/cells.parquet``, written
atomically, setting each cell's QC flags against its plate's medians on the way (:mod:`bio.qc`).

The medians need every cell of a plate before the first row is written, so the fields' focus scores and nucleus
areas come first: from memory for the fields this process embedded, from the rows files for the others (a resumed
run's earlier fields, other ranks' fields). The rows are then read once and written in whole zarr chunks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from bio.embed_store import merge_inputs, read_rows
from bio.fields import FieldInfo
from bio.qc import QcThresholds, flag_cells, plate_medians, qc_schema, qc_values
from core.io import atomic_path

_CHUNK_BYTES = 8 * 2**20


def merge_parts(
    run: Path,
    fields: list[FieldInfo],
    commits: dict[int, tuple[Path, dict[str, Any]]],
    dim: int,
    dtype: str,
    chunk_rows: int,
    attrs: dict[str, Any],
    head_meta: dict[str, Any] | None,
    channel_names: list[str],
    qc: QcThresholds,
    measured: Mapping[int, dict[str, np.ndarray]] | None = None,
) -> int:
    """Concatenate the parts in field order into ``embeddings.zarr`` + ``cells.parquet``, writing whole chunks; the QC
    flags of each cell are set against its plate's medians, from ``measured`` (:attr:`PartWriter.measured` of the
    fields this process wrote) or else read first from the rows files."""
    n_total = sum(commits[f.index][1]["n"] for f in fields)
    measured = measured or {}
    medians = plate_medians(
        (f.plate, measured[f.index] if f.index in measured else merge_inputs(read_rows(*commits[f.index])))
        for f in fields
    )
    rows = chunk_rows or max(64, _CHUNK_BYTES // max(1, dim * np.dtype(dtype).itemsize))
    with atomic_path(run / "embeddings.zarr", is_dir=True) as store, atomic_path(run / "cells.parquet") as table:
        group = zarr.open_group(store, mode="w", zarr_format=3)
        # one write of the group's metadata (attrs.update would rewrite it once per key)
        group.update_attributes(
            json.loads(json.dumps({**attrs, "n_cells": n_total, "n_fields": len(fields)}, default=str))
        )
        array = group.create_array("embeddings", shape=(n_total, dim), chunks=(rows, dim), dtype=dtype)
        writer = pq.ParquetWriter(table, _cells_schema(head_meta, channel_names))
        pending: list[dict[str, np.ndarray]] = []
        written = buffered = 0
        for field in [*fields, None]:
            if field is not None:
                part, record = commits[field.index]
                rows_of = read_rows(part, record)
                for key in ("plate", "well", "site"):
                    rows_of[key] = np.full(record["n"], getattr(field, key), dtype=object)
                rows_of.update(flag_cells(rows_of, medians[field.plate], qc))
                pending.append(rows_of)
                buffered += record["n"]
            take = buffered if field is None else (buffered // rows) * rows
            if not take:
                continue
            joined = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
            array[written : written + take] = joined["embeddings"][:take]
            writer.write_table(
                pa.table(
                    _cell_columns({k: v[:take] for k, v in joined.items()}, head_meta, channel_names),
                    schema=writer.schema,
                )
            )
            pending = [{k: v[take:] for k, v in joined.items()}] if buffered > take else []
            written, buffered = written + take, buffered - take
        writer.close()
    return n_total


def _cells_schema(head_meta: dict[str, Any] | None, channel_names: list[str]) -> Any:
    columns = [
        ("plate", pa.string()),
        ("well", pa.string()),
        ("site", pa.string()),
        ("cell_id", pa.int64()),
        ("x", pa.float64()),
        ("y", pa.float64()),
        ("edge", pa.bool_()),
        *qc_schema(channel_names),
    ]
    if head_meta:
        columns.append((f"predicted_{head_meta['label']}", pa.string()))
        columns += [(f"prob_{name}", pa.float32()) for name in head_meta["classes"]]
    return pa.schema(columns)


def _cell_columns(
    rows: dict[str, np.ndarray], head_meta: dict[str, Any] | None, channel_names: list[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {key: rows[key] for key in ("plate", "well", "site", "cell_id", "x", "y", "edge")}
    out.update(qc_values(rows, channel_names))
    if head_meta:
        classes = np.asarray(head_meta["classes"], dtype=object)
        probs = rows["probabilities"]
        out[f"predicted_{head_meta['label']}"] = classes[probs.argmax(axis=1)] if len(probs) else classes[:0]
        out.update({f"prob_{name}": probs[:, k] for k, name in enumerate(head_meta["classes"])})
    return out
