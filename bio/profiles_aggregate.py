"""Streaming aggregation of per-cell embeddings into one profile per (plate, well), median or mean.

Done here instead of by ``pycytominer.aggregate``, because that needs every cell in memory; here memory is bounded
by the number of wells (mean) or by ``memory_budget_bytes`` (median, read in several passes when wells interleave).
"""

from __future__ import annotations

import heapq
import logging
import os
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from bio.profiles import FEATURE_PREFIX, EmbeddingRun, meta_column, normalise_well_names, open_run
from bio.qc import FLAG_COLUMNS, has_qc
from core.errors import DinoscopeError
from core.logging import progress

log = logging.getLogger(__name__)

AGGREGATIONS = ("median", "mean")
_BATCH_BYTES = 32 * 2**20  # embeddings read per step; large enough to amortise zarr overhead


def aggregate_wells(
    run_dir: str | os.PathLike,
    *,
    operation: str = "median",
    drop_edge_cells: bool = False,
    qc: bool = False,
    memory_budget_bytes: int = 2**30,
) -> pd.DataFrame:
    """Aggregate per-cell embeddings into one profile per (plate, well), streaming over zarr chunks.

    Args:
        run_dir: embedding run directory (``embeddings.zarr`` + ``cells.parquet``).
        operation: ``median`` (exact, per feature) or ``mean``.
        drop_edge_cells: skip cells flagged ``edge`` (crop touches the field border).
        qc: skip cells with any QC flag (``edge``, ``qc_blur``, ``qc_saturated``, ``qc_debris``; :mod:`bio.qc`).
        memory_budget_bytes: upper bound on buffered cell embeddings for the median.

    Returns:
        DataFrame with ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_n_cells`` (cells aggregated) and
        ``emb_0..emb_{D-1}``.
    """
    if operation not in AGGREGATIONS:
        raise DinoscopeError(
            f"unknown aggregation {operation!r}", field="aggregate", fix=f"use one of {', '.join(AGGREGATIONS)}"
        )
    run = open_run(run_dir)
    if qc and not has_qc(run.cells_path):
        raise DinoscopeError(
            "the run's cells carry no QC flags (it was embedded before per-cell QC existed)",
            path=run.cells_path,
            field="qc",
            fix="embed the plates again with this version, or leave out --qc",
        )
    flags = list(FLAG_COLUMNS) if qc else (["edge"] if drop_edge_cells else [])
    columns = ["plate", "well", *flags]
    missing = [c for c in columns if c not in pq.ParquetFile(run.cells_path).schema_arrow.names]
    if missing:
        raise DinoscopeError(
            f"cells.parquet lacks column(s) {missing}",
            path=run.cells_path,
            field=missing[0],
            fix="the per-cell table needs plate, well, site, cell_id, x, y, edge",
        )
    rows = _batch_rows(run)
    drop = bool(flags)
    wells = _scan_wells(run, columns, rows, drop)
    counts = wells["count"].to_numpy()
    result = np.zeros((len(wells), run.dim), np.float64)
    if operation == "mean":
        for codes, emb in _embedding_batches(run, wells, columns, rows, drop, "aggregate (mean)"):
            order = np.argsort(codes, kind="stable")
            uniq, starts = np.unique(codes[order], return_index=True)
            if len(uniq):
                result[uniq] += np.add.reduceat(emb[order].astype(np.float64), starts, axis=0)
        result /= counts[:, None]
    else:
        budget = max(1, memory_budget_bytes // (4 * run.dim))
        passes = _plan_median_passes(wells, budget)
        for k, group in enumerate(passes):
            _median_pass(
                run,
                wells,
                group,
                result,
                columns,
                rows,
                drop,
                f"aggregate (median, pass {k + 1}/{len(passes)})",
            )
    out = pd.DataFrame(
        {
            meta_column("plate"): wells.index.get_level_values(0),
            meta_column("well"): wells.index.get_level_values(1),
            "Metadata_n_cells": counts,
        }
    )
    feats = pd.DataFrame(result.astype(np.float32), columns=[f"{FEATURE_PREFIX}{j}" for j in range(run.dim)])
    log.info("aggregated %d cells into %d wells (%s)", counts.sum(), len(out), operation)
    return pd.concat([out, feats], axis=1)


def _cell_batches(run: EmbeddingRun, columns: list[str], rows: int) -> Iterator[tuple[int, pd.DataFrame]]:
    """Yield ``(start_row, frame)`` with exactly ``rows`` rows per frame (except the last), read lazily."""
    pending: list[pd.DataFrame] = []
    n_pending, start = 0, 0
    for batch in pq.ParquetFile(run.cells_path).iter_batches(batch_size=rows, columns=columns):
        pending.append(batch.to_pandas())
        n_pending += batch.num_rows
        while n_pending >= rows:
            frame = pd.concat(pending, ignore_index=True)
            yield start, frame.iloc[:rows].reset_index(drop=True)
            rest = frame.iloc[rows:].reset_index(drop=True)
            pending, n_pending, start = ([rest] if len(rest) else []), len(rest), start + rows
    if n_pending:
        yield start, pd.concat(pending, ignore_index=True)


def _batch_rows(run: EmbeddingRun) -> int:
    array = run.embeddings
    chunk = int((getattr(array, "shards", None) or array.chunks)[0])
    per_row = max(1, run.dim * array.dtype.itemsize)
    return chunk * max(1, _BATCH_BYTES // (chunk * per_row))


def well_keys(frame: pd.DataFrame) -> pd.MultiIndex:
    """The (plate, well) index of a batch of the per-cell table, wells written ``A01`` whatever their padding."""
    codes, uniques = pd.factorize(frame["well"].astype(str))  # parse each distinct well name once
    wells = normalise_well_names(pd.Series(uniques, dtype=str)).to_numpy()[codes]
    return pd.MultiIndex.from_arrays([frame["plate"].astype(str), wells], names=["plate", "well"])


def _kept(frame: pd.DataFrame, drop: bool) -> np.ndarray:
    """Cells of a batch that are aggregated: all, or (``drop``) those without any of the batch's flag columns."""
    flags = [c for c in frame.columns if c not in ("plate", "well")]
    if not drop or not flags:
        return np.ones(len(frame), bool)
    return ~frame[flags].astype(bool).to_numpy().any(axis=1)


def _scan_wells(run: EmbeddingRun, columns: list[str], rows: int, drop: bool) -> pd.DataFrame:
    """Metadata-only pass: cells per well and the first/last row each well occupies."""
    table: pd.DataFrame | None = None
    for start, frame in _cell_batches(run, columns, rows):
        keep = _kept(frame, drop)
        row = pd.Series(np.arange(start, start + len(frame)), index=well_keys(frame))[keep]
        part = row.groupby(level=[0, 1]).agg(["size", "min", "max"])
        part.columns = ["count", "first", "last"]
        table = (
            part
            if table is None
            else pd.concat([table, part]).groupby(level=[0, 1]).agg({"count": "sum", "first": "min", "last": "max"})
        )
    if table is None or table.empty:
        raise DinoscopeError(
            "no cells to aggregate" + (" after dropping flagged cells" if drop else ""),
            path=run.cells_path,
            fix="check the run, or do not drop flagged cells",
        )
    return table.sort_index()


def _plan_median_passes(wells: pd.DataFrame, budget_cells: int) -> list[np.ndarray]:
    """Group wells so that the cells buffered at once (wells begun but not yet complete) stay under budget.

    A well's rows are buffered from its first to its last row. Runs written well by well need one pass; a run
    whose wells are interleaved is read several times, each pass holding a subset of wells.
    """
    first, last, count = (wells[c].to_numpy() for c in ("first", "last", "count"))
    groups: list[list[int]] = [[]]
    open_heap: list[tuple[int, int]] = []  # (last row, cells) of the current group's wells
    open_cells = peak = 0
    for i in np.argsort(first, kind="stable"):
        while open_heap and open_heap[0][0] < first[i]:
            open_cells -= heapq.heappop(open_heap)[1]
        if groups[-1] and max(peak, open_cells + count[i]) > budget_cells:
            groups.append([])
            open_heap, open_cells, peak = [], 0, 0
        groups[-1].append(int(i))
        heapq.heappush(open_heap, (int(last[i]), int(count[i])))
        open_cells += int(count[i])
        peak = max(peak, open_cells)
    return [np.asarray(g) for g in groups]


def _embedding_batches(
    run: EmbeddingRun, wells: pd.DataFrame, columns: list[str], rows: int, drop: bool, desc: str
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(well_codes, embeddings)`` per batch; codes index ``wells`` rows, dropped cells are removed."""
    n_batches = -(-run.n_cells // rows)
    for start, frame in progress(_cell_batches(run, columns, rows), total=n_batches, desc=desc, unit="batch"):
        codes = wells.index.get_indexer(well_keys(frame))
        emb = np.asarray(run.embeddings[start : start + len(frame)], dtype=np.float32)
        if not np.isfinite(emb).all():
            bad = start + int(np.flatnonzero(~np.isfinite(emb).all(axis=1))[0])
            raise DinoscopeError(
                f"embedding row {bad} contains NaN or inf",
                path=run.root / "embeddings.zarr",
                field="embeddings",
                fix="re-run the embedding command (check input images)",
            )
        keep = (codes >= 0) & _kept(frame, drop)
        yield codes[keep], emb[keep]


def _median_pass(
    run: EmbeddingRun,
    wells: pd.DataFrame,
    group: np.ndarray,
    result: np.ndarray,
    columns: list[str],
    rows: int,
    drop: bool,
    desc: str,
) -> None:
    """Buffer the cells of ``group``'s wells; a well's median is taken as soon as its last cell has been read."""
    in_group = np.zeros(len(wells), bool)
    in_group[group] = True
    need = wells["count"].to_numpy().copy()
    buffers: dict[int, list[np.ndarray]] = {}
    remaining = len(group)
    for codes, emb in _embedding_batches(run, wells, columns, rows, drop, desc):
        sel = in_group[codes]
        codes, emb = codes[sel], emb[sel]
        order = np.argsort(codes, kind="stable")
        uniq, starts = np.unique(codes[order], return_index=True)
        for code, part in zip(uniq, np.split(emb[order], starts[1:]), strict=False):
            buffers.setdefault(int(code), []).append(part)
            need[code] -= len(part)
            if need[code] == 0:
                result[code] = np.median(np.concatenate(buffers.pop(int(code))), axis=0)
                remaining -= 1
        if remaining == 0:
            break
