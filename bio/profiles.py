"""Well profiles from per-cell embeddings: streaming aggregation, plate-map join, control-based normalisation.

An embedding run directory ``RUN/`` holds ``embeddings.zarr`` (a zarr v3 group whose array ``embeddings`` is
``[n_cells, D]``, chunked by rows) and ``cells.parquet`` (one row per cell: ``plate, well, site, cell_id, x, y,
edge`` plus the quality-control columns of :mod:`bio.qc`; row i describes embedding row i). Profiles follow the
JUMP / pycytominer convention: metadata columns are ``Metadata_<name>``, with the plate coordinates spelled as in
JUMP and CellProfiler (``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site``) and every other plate-map column
prefixed as it is spelled there (``role`` -> ``Metadata_role``; ``Metadata_pert_iname`` stays as it is). Features
are ``emb_0 .. emb_{D-1}`` in memory; a profile file may store them under another prefix (``--feature-prefix
Cells_DINO_`` lets pycytominer's ``features="infer"``, which looks for the ``Cells_``/``Nuclei_``/``Cytoplasm_``
compartments, find them), recorded in its provenance and mapped back on reading.

The pipeline is the JUMP / pycytominer one (Way et al., pycytominer, JOSS 2022; Chandrasekaran et al., JUMP
Cell Painting, Nat Methods 2024): aggregate cells per well (median or mean), annotate with the plate map,
normalise each plate against its negative-control wells (``pycytominer.normalize``), and optionally build
treatment-level consensus profiles (``pycytominer.consensus``).

This module holds the table conventions, the run reader and profile Parquet I/O; the steps live in
:mod:`bio.profiles_aggregate` (streaming, instead of ``pycytominer.aggregate``), :mod:`bio.profiles_platemap` and
:mod:`bio.profiles_normalise`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from core.errors import DinoscopeError
from core.io import atomic_path

_WELL_NAME = re.compile(r"^([A-Za-z]+)0*(\d+)$")  # a well: row letters, column number

META_PREFIX = "Metadata_"
FEATURE_PREFIX = "emb_"
PROVENANCE_KEY = b"dinoscope"
# Plate coordinates in JUMP / CellProfiler spelling, whatever the case or prefix they are given with.
JUMP_KEYS = {"plate": "Metadata_Plate", "well": "Metadata_Well", "site": "Metadata_Site"}


@dataclass(frozen=True)
class EmbeddingRun:
    """An opened, validated embedding run directory."""

    root: Path
    embeddings: zarr.Array  # [n_cells, D]
    cells_path: Path
    n_cells: int
    dim: int


def meta_column(name: str) -> str:
    """``role`` -> ``Metadata_role``; names that already carry the prefix are returned unchanged, and the plate
    coordinates get JUMP's spelling (``plate``, ``Metadata_plate`` -> ``Metadata_Plate``; likewise well and site)."""
    bare = name[len(META_PREFIX) :] if name.lower().startswith(META_PREFIX.lower()) else name
    if bare.lower() in JUMP_KEYS:
        return JUMP_KEYS[bare.lower()]
    return name if name.startswith(META_PREFIX) else META_PREFIX + name


def check_feature_prefix(prefix: str) -> str:
    """A feature prefix a profile file can use: non-empty, not a metadata prefix, no digits at its end."""
    if not prefix or prefix.lower().startswith(META_PREFIX.lower()) or prefix[-1].isdigit():
        raise DinoscopeError(
            f"feature prefix {prefix!r} cannot be used",
            field="feature_prefix",
            fix="use a non-empty prefix that neither starts with Metadata_ nor ends with a digit, e.g. Cells_DINO_",
        )
    return prefix


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
    parts = text.str.extract(_WELL_NAME.pattern)
    ok = parts[0].notna()
    out = text.copy()
    out[ok] = parts.loc[ok, 0].str.upper() + parts.loc[ok, 1].astype(int).map("{:02d}".format)
    return out


def normalise_well_name(well: str) -> str:
    """:func:`normalise_well_names` of one name, without pandas (a thousand times cheaper for one value)."""
    text = str(well).strip()
    match = _WELL_NAME.match(text)
    return f"{match[1].upper()}{int(match[2]):02d}" if match else text


def open_run(run_dir: str | os.PathLike) -> EmbeddingRun:
    """Open ``RUN/embeddings.zarr`` and ``RUN/cells.parquet`` and check that they describe the same cells.

    Example::

        from bio import open_run
        run = open_run("runs/embed")
        run.n_cells, run.dim, run.embeddings[:1000]   # a zarr array: slices read only what they need
    """
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


def write_profiles(
    profiles: pd.DataFrame,
    path: str | os.PathLike,
    *,
    provenance: dict[str, Any] | None = None,
    feature_prefix: str = FEATURE_PREFIX,
) -> None:
    """Write profiles to Parquet atomically; ``provenance`` travels in the file's schema metadata.

    Features are stored as ``<feature_prefix><j>`` (recorded in the provenance, so :func:`read_profiles` maps them
    back to ``emb_<j>``).
    """
    if feature_prefix != FEATURE_PREFIX:
        check_feature_prefix(feature_prefix)
        renamed = {c: feature_prefix + c[len(FEATURE_PREFIX) :] for c in feature_columns(profiles)}
        clash = sorted(set(renamed.values()) & set(profiles.columns))
        if clash:
            raise DinoscopeError(
                f"feature prefix {feature_prefix!r} gives column names the profiles already use ({clash[0]})",
                field="feature_prefix",
                fix="choose another --feature-prefix",
            )
        profiles = profiles.rename(columns=renamed)
    if provenance is not None or feature_prefix != FEATURE_PREFIX:
        provenance = {**(provenance or {}), "feature_prefix": feature_prefix}
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
    provenance = json.loads(raw) if raw else {}
    profiles = table.to_pandas()
    prefix = provenance.get("feature_prefix") or FEATURE_PREFIX
    if prefix != FEATURE_PREFIX:  # stored under another prefix: back to emb_<j>
        stored = [c for c in profiles.columns if c.startswith(prefix) and c[len(prefix) :].isdigit()]
        profiles = profiles.rename(columns={c: FEATURE_PREFIX + c[len(prefix) :] for c in stored})
    # files written before the JUMP spelling (Metadata_plate, Metadata_well) read as today's
    legacy = {c: meta_column(c) for c in profiles.columns if c.startswith(META_PREFIX) and meta_column(c) != c}
    profiles = profiles.rename(columns={c: n for c, n in legacy.items() if n not in profiles.columns})
    if not feature_columns(profiles):
        raise DinoscopeError(
            f"no feature columns {prefix}0..{prefix}N",
            path=path,
            field=f"{prefix}*",
            fix="pass a Parquet file written by `dinoscope cells profile`",
        )
    return profiles, provenance
