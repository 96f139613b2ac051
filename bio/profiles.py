"""Well profiles from per-cell embeddings: streaming aggregation, plate-map join, control-based normalisation.

An embedding run directory ``RUN/`` holds ``embeddings.zarr`` (a zarr v3 group whose array ``embeddings`` is
``[n_cells, D]``, chunked by rows) and ``cells.parquet`` (one row per cell: ``plate, well, site, cell_id, x, y,
edge``; row i describes embedding row i). Profiles follow the pycytominer convention: metadata columns are
``Metadata_<name>`` (``<name>`` as spelled in the run or plate map, e.g. ``Metadata_plate``, ``Metadata_role``)
and features are ``emb_0 .. emb_{D-1}``.

The pipeline is the JUMP / pycytominer one (Way et al., pycytominer, JOSS 2022; Chandrasekaran et al., JUMP
Cell Painting, Nat Methods 2024): aggregate cells per well (median or mean), annotate with the plate map,
normalise each plate against its negative-control wells (``pycytominer.normalize``), and optionally build
treatment-level consensus profiles (``pycytominer.consensus``). Only aggregation is done here instead of by
``pycytominer.aggregate``, because that needs every cell in memory; here memory is bounded by the number of wells.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from core.errors import DinoscopeError
from core.io import atomic_path
from core.logging import progress

log = logging.getLogger(__name__)

META_PREFIX = "Metadata_"
FEATURE_PREFIX = "emb_"
AGGREGATIONS = ("median", "mean")
NORMALISATIONS = ("mad_robustize", "standardize", "spherize", "none")
PLATEMAP_REQUIRED = ("well", "treatment", "role")
PROVENANCE_KEY = b"dinoscope"
_BATCH_BYTES = 32 * 2**20  # embeddings read per step; large enough to amortise zarr overhead


@dataclass(frozen=True)
class EmbeddingRun:
    """An opened, validated embedding run directory."""

    root: Path
    embeddings: zarr.Array  # [n_cells, D]
    cells_path: Path
    n_cells: int
    dim: int


def meta_column(name: str) -> str:
    """``role`` -> ``Metadata_role``; names that already carry the prefix are returned unchanged."""
    return name if name.startswith(META_PREFIX) else META_PREFIX + name


def feature_columns(profiles: pd.DataFrame) -> list[str]:
    """The embedding feature columns ``emb_*`` in numeric order."""
    cols = [c for c in profiles.columns if c.startswith(FEATURE_PREFIX) and c[len(FEATURE_PREFIX) :].isdigit()]
    return sorted(cols, key=lambda c: int(c[len(FEATURE_PREFIX) :]))


def metadata_columns(profiles: pd.DataFrame) -> list[str]:
    """The ``Metadata_*`` columns, in table order."""
    return [c for c in profiles.columns if c.startswith(META_PREFIX)]


def normalise_well_names(wells: pd.Series) -> pd.Series:
    """``a1``, ``A1`` and ``A001`` all become ``A01``, so run and plate map match whatever the zero padding."""
    text = wells.astype(str).str.strip()
    parts = text.str.extract(r"^([A-Za-z]+)0*(\d+)$")
    ok = parts[0].notna()
    out = text.copy()
    out[ok] = parts.loc[ok, 0].str.upper() + parts.loc[ok, 1].astype(int).map("{:02d}".format)
    return out


def open_run(run_dir: str | os.PathLike) -> EmbeddingRun:
    """Open ``RUN/embeddings.zarr`` and ``RUN/cells.parquet`` and check that they describe the same cells."""
    root = Path(run_dir)
    if not root.is_dir():
        raise DinoscopeError(
            "embedding run directory not found", path=root, fix="pass the directory written by `dinoscope cells embed`"
        )
    store = root / "embeddings.zarr"
    if not store.exists():
        raise DinoscopeError(
            "run has no embeddings",
            path=root,
            field="embeddings.zarr",
            fix="run `dinoscope cells embed` into this directory first, or pass the right RUN",
        )
    try:
        array = zarr.open_group(store, mode="r")["embeddings"]
    except Exception as err:  # zarr raises KeyError, FileNotFoundError or its own errors
        raise DinoscopeError(
            f"cannot read array 'embeddings' ({err})",
            path=store,
            field="embeddings",
            fix="the store must be a zarr v3 group holding an [n_cells, D] array 'embeddings'",
        ) from err
    if array.ndim != 2:
        raise DinoscopeError(
            f"embeddings must be 2-D [n_cells, D], got shape {array.shape}",
            path=store,
            field="embeddings",
            fix="re-run the embedding command",
        )
    cells = root / "cells.parquet"
    try:
        n_rows = pq.ParquetFile(cells).metadata.num_rows
    except Exception as err:
        raise DinoscopeError(
            f"cannot read the per-cell table ({err})",
            path=cells,
            fix="the run needs cells.parquet with one row per embedding row",
        ) from err
    if n_rows != array.shape[0]:
        raise DinoscopeError(
            f"cells.parquet has {n_rows} rows but embeddings has {array.shape[0]}",
            path=root,
            fix="the run is incomplete or mixed; re-run the embedding command",
        )
    return EmbeddingRun(root, array, cells, int(array.shape[0]), int(array.shape[1]))


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


def _keys(frame: pd.DataFrame) -> pd.MultiIndex:
    codes, uniques = pd.factorize(frame["well"].astype(str))  # parse each distinct well name once
    wells = normalise_well_names(pd.Series(uniques, dtype=str)).to_numpy()[codes]
    return pd.MultiIndex.from_arrays([frame["plate"].astype(str), wells], names=["plate", "well"])


def _scan_wells(run: EmbeddingRun, columns: list[str], rows: int, drop_edge: bool) -> pd.DataFrame:
    """Metadata-only pass: cells per well and the first/last row each well occupies."""
    table: pd.DataFrame | None = None
    for start, frame in _cell_batches(run, columns, rows):
        keep = ~frame["edge"].astype(bool).to_numpy() if drop_edge else np.ones(len(frame), bool)
        row = pd.Series(np.arange(start, start + len(frame)), index=_keys(frame))[keep]
        part = row.groupby(level=[0, 1]).agg(["size", "min", "max"])
        part.columns = ["count", "first", "last"]
        table = (
            part
            if table is None
            else pd.concat([table, part]).groupby(level=[0, 1]).agg({"count": "sum", "first": "min", "last": "max"})
        )
    if table is None or table.empty:
        raise DinoscopeError(
            "no cells to aggregate" + (" after dropping edge cells" if drop_edge else ""),
            path=run.cells_path,
            fix="check the run, or do not drop edge cells",
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
    run: EmbeddingRun, wells: pd.DataFrame, columns: list[str], rows: int, drop_edge: bool, desc: str
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(well_codes, embeddings)`` per batch; codes index ``wells`` rows, dropped cells are removed."""
    n_batches = -(-run.n_cells // rows)
    for start, frame in progress(_cell_batches(run, columns, rows), total=n_batches, desc=desc, unit="batch"):
        codes = wells.index.get_indexer(_keys(frame))
        emb = np.asarray(run.embeddings[start : start + len(frame)], dtype=np.float32)
        if not np.isfinite(emb).all():
            bad = start + int(np.flatnonzero(~np.isfinite(emb).all(axis=1))[0])
            raise DinoscopeError(
                f"embedding row {bad} contains NaN or inf",
                path=run.root / "embeddings.zarr",
                field="embeddings",
                fix="re-run the embedding command (check input images)",
            )
        keep = codes >= 0
        if drop_edge:
            keep &= ~frame["edge"].astype(bool).to_numpy()
        yield codes[keep], emb[keep]


def aggregate_wells(
    run_dir: str | os.PathLike,
    *,
    operation: str = "median",
    drop_edge_cells: bool = False,
    memory_budget_bytes: int = 2**30,
) -> pd.DataFrame:
    """Aggregate per-cell embeddings into one profile per (plate, well), streaming over zarr chunks.

    Args:
        run_dir: embedding run directory (``embeddings.zarr`` + ``cells.parquet``).
        operation: ``median`` (exact, per feature) or ``mean``.
        drop_edge_cells: skip cells flagged ``edge`` (crop touches the field border).
        memory_budget_bytes: upper bound on buffered cell embeddings for the median.

    Returns:
        DataFrame with ``Metadata_plate``, ``Metadata_well``, ``Metadata_n_cells`` and ``emb_0..emb_{D-1}``.
    """
    if operation not in AGGREGATIONS:
        raise DinoscopeError(
            f"unknown aggregation {operation!r}", field="aggregate", fix=f"use one of {', '.join(AGGREGATIONS)}"
        )
    run = open_run(run_dir)
    columns = ["plate", "well"] + (["edge"] if drop_edge_cells else [])
    missing = [c for c in columns if c not in pq.ParquetFile(run.cells_path).schema_arrow.names]
    if missing:
        raise DinoscopeError(
            f"cells.parquet lacks column(s) {missing}",
            path=run.cells_path,
            field=missing[0],
            fix="the per-cell table needs plate, well, site, cell_id, x, y, edge",
        )
    rows = _batch_rows(run)
    wells = _scan_wells(run, columns, rows, drop_edge_cells)
    counts = wells["count"].to_numpy()
    result = np.zeros((len(wells), run.dim), np.float64)
    if operation == "mean":
        for codes, emb in _embedding_batches(run, wells, columns, rows, drop_edge_cells, "aggregate (mean)"):
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
                drop_edge_cells,
                f"aggregate (median, pass {k + 1}/{len(passes)})",
            )
    out = pd.DataFrame(
        {
            "Metadata_plate": wells.index.get_level_values(0),
            "Metadata_well": wells.index.get_level_values(1),
            "Metadata_n_cells": counts,
        }
    )
    feats = pd.DataFrame(result.astype(np.float32), columns=[f"{FEATURE_PREFIX}{j}" for j in range(run.dim)])
    log.info("aggregated %d cells into %d wells (%s)", counts.sum(), len(out), operation)
    return pd.concat([out, feats], axis=1)


def _median_pass(
    run: EmbeddingRun,
    wells: pd.DataFrame,
    group: np.ndarray,
    result: np.ndarray,
    columns: list[str],
    rows: int,
    drop_edge: bool,
    desc: str,
) -> None:
    """Buffer the cells of ``group``'s wells; a well's median is taken as soon as its last cell has been read."""
    in_group = np.zeros(len(wells), bool)
    in_group[group] = True
    need = wells["count"].to_numpy().copy()
    buffers: dict[int, list[np.ndarray]] = {}
    remaining = len(group)
    for codes, emb in _embedding_batches(run, wells, columns, rows, drop_edge, desc):
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


def read_platemap(path: str | os.PathLike) -> pd.DataFrame:
    """Read a plate-map CSV (``plate, well, treatment, role`` plus any annotation such as ``moa``).

    ``plate`` may be omitted when one layout applies to every plate. All values are read as text.
    """
    path = Path(path)
    try:
        platemap = pd.read_csv(path, dtype=str, skipinitialspace=True)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise DinoscopeError(
            f"cannot read the plate map ({err})", path=path, fix="pass a CSV with columns plate, well, treatment, role"
        ) from err
    platemap.columns = [str(c).strip() for c in platemap.columns]
    missing = [c for c in PLATEMAP_REQUIRED if c not in platemap.columns]
    if missing:
        raise DinoscopeError(
            f"plate map lacks column(s) {missing}; it has {list(platemap.columns)}",
            path=path,
            field=missing[0],
            fix="add the columns plate, well, treatment, role",
        )
    platemap["well"] = normalise_well_names(platemap["well"])
    keys = [c for c in ("plate", "well") if c in platemap.columns]
    dup = platemap.duplicated(keys, keep=False)
    if dup.any():
        first = platemap.loc[dup, keys].iloc[0].to_dict()
        raise DinoscopeError(
            f"plate map lists {dup.sum()} rows for repeated wells, e.g. {first}",
            path=path,
            field="well",
            fix="give each (plate, well) exactly one row",
        )
    return platemap


def annotate_wells(wells: pd.DataFrame, platemap: pd.DataFrame) -> pd.DataFrame:
    """Join the plate map onto well profiles by (plate, well), or by well alone when the map has no plate."""
    renamed = platemap.rename(columns={c: meta_column(c) for c in platemap.columns})
    renamed["Metadata_well"] = normalise_well_names(renamed["Metadata_well"])
    on = [c for c in ("Metadata_plate", "Metadata_well") if c in renamed.columns]
    merged = wells.merge(renamed, on=on, how="left", indicator=True, validate="many_to_one")
    unmatched = merged["_merge"] == "left_only"
    if unmatched.all():
        example = wells[on].iloc[0].to_dict()
        raise DinoscopeError(
            f"no well of the run is in the plate map (e.g. {example})",
            field="plate/well",
            fix="check the plate names and well ids in the plate map",
        )
    if unmatched.any():
        log.warning("dropping %d wells absent from the plate map", int(unmatched.sum()))
    merged = merged.loc[~unmatched].drop(columns="_merge").reset_index(drop=True)
    meta = metadata_columns(merged)
    return merged[meta + [c for c in merged.columns if c not in meta]]


def normalise_profiles(
    profiles: pd.DataFrame,
    *,
    method: str = "mad_robustize",
    control_column: str = "role",
    control_value: str = "negative_control",
    by: str | None = "plate",
) -> pd.DataFrame:
    """Normalise features of each plate (``by``) against its negative-control wells with ``pycytominer.normalize``.

    ``mad_robustize`` subtracts the controls' median and divides by their scaled MAD, ``standardize`` uses mean and
    standard deviation, ``spherize`` whitens (ZCA-cor) on the controls (pycytominer; Way et al., JOSS 2022).
    ``by=None`` fits one transform on all controls.
    """
    from pycytominer import normalize

    if method not in NORMALISATIONS:
        raise DinoscopeError(
            f"unknown normalisation {method!r}", field="normalise", fix=f"use one of {', '.join(NORMALISATIONS)}"
        )
    column = meta_column(control_column)
    if column not in profiles.columns:
        raise DinoscopeError(
            f"no control column {control_column!r} in the profiles",
            field=control_column,
            fix="pass --control-column naming a plate-map column (e.g. role)",
        )
    is_control = profiles[column].astype(str) == str(control_value)
    if not is_control.any():
        raise DinoscopeError(
            f"no well has {control_column} == {control_value!r}",
            field=control_column,
            fix="mark negative-control wells in the plate map, or pass --control-value",
        )
    if method == "none":
        return profiles.copy()
    features, meta = feature_columns(profiles), metadata_columns(profiles)
    query = f"`{column}` == {str(control_value)!r}"
    groups = profiles.groupby(meta_column(by), sort=False) if by else [("all", profiles)]
    parts = []
    for name, group in groups:
        n_controls = int(is_control[group.index].sum())
        if n_controls < 2:
            raise DinoscopeError(
                f"plate {name!r} has {n_controls} control well(s); normalisation needs >= 2",
                field=control_column,
                fix="add control wells to that plate, or drop the plate",
            )
        try:
            parts.append(normalize(profiles=group, features=features, meta_features=meta, samples=query, method=method))
        except ValueError as err:
            raise DinoscopeError(
                f"{method} failed on plate {name!r}: {err}",
                field="normalise",
                fix="use mad_robustize, or more control wells for spherize",
            ) from err
    out = pd.concat(parts).loc[profiles.index]
    out[features] = out[features].astype(np.float32)
    return out


def treatment_consensus(
    profiles: pd.DataFrame, *, treatment_column: str = "treatment", operation: str = "median"
) -> pd.DataFrame:
    """One consensus profile per treatment (``pycytominer.consensus``), keeping metadata constant per treatment."""
    from pycytominer import consensus

    column = meta_column(treatment_column)
    if column not in profiles.columns:
        raise DinoscopeError(
            f"no treatment column {treatment_column!r}",
            field=treatment_column,
            fix="the plate map needs a treatment column",
        )
    per_well = {"Metadata_plate", "Metadata_well", "Metadata_n_cells", column}
    filled = profiles.copy()
    constant = []
    for c in metadata_columns(profiles):
        if c not in per_well and (filled.groupby(column)[c].nunique(dropna=False) <= 1).all():
            filled[c] = filled[c].fillna("")  # groupby would drop treatments whose annotation is missing
            constant.append(c)
    out = consensus(
        filled, replicate_columns=[column] + constant, operation=operation, features=feature_columns(profiles)
    )
    sizes = profiles.groupby(column).agg(Metadata_n_wells=(column, "size"))
    if "Metadata_n_cells" in profiles.columns:
        sizes["Metadata_n_cells"] = profiles.groupby(column)["Metadata_n_cells"].sum()
    out = out.merge(sizes, left_on=column, right_index=True)
    return out[metadata_columns(out) + feature_columns(out)].reset_index(drop=True)


def write_profiles(
    profiles: pd.DataFrame, path: str | os.PathLike, *, provenance: dict[str, Any] | None = None
) -> None:
    """Write profiles to Parquet atomically; ``provenance`` travels in the file's schema metadata."""
    table = pa.Table.from_pandas(profiles, preserve_index=False)
    if provenance is not None:
        meta = dict(table.schema.metadata or {})
        meta[PROVENANCE_KEY] = json.dumps(provenance, default=str).encode()
        table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_profiles(path: str | os.PathLike) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read profiles written by :func:`write_profiles`; returns the table and its provenance (``{}`` if none)."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises OSError/ArrowInvalid for missing or corrupt files
        raise DinoscopeError(
            f"cannot read profiles ({err})", path=path, fix="pass a Parquet file written by `dinoscope cells profile`"
        ) from err
    raw = (table.schema.metadata or {}).get(PROVENANCE_KEY)
    profiles = table.to_pandas()
    if not feature_columns(profiles):
        raise DinoscopeError(
            "no feature columns emb_0..emb_N",
            path=path,
            field="emb_*",
            fix="pass a Parquet file written by `dinoscope cells profile`",
        )
    return profiles, (json.loads(raw) if raw else {})
