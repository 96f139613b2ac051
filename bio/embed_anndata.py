"""``dinoscope cells embed --format anndata``: the run's cells as an AnnData store, ``RUN/cells.h5ad``.

``obs`` is the per-cell table (``cells.parquet``: plate, well, site, cell id, centroid, QC columns; text columns as
categoricals), ``X`` the embeddings ``[n_cells, D]``, ``var`` names the features ``emb_0 .. emb_{D-1}`` and
``uns["dinoscope"]`` holds the run's metadata as JSON, so scanpy (``scanpy.read_h5ad``) and anndata open it
directly (Virshup et al., "anndata: Access and store annotated data matrices", JOSS 2024).

``X`` is streamed from ``embeddings.zarr`` into the HDF5 file block by block, written as anndata's dense-array
encoding (``encoding-type: array``, ``encoding-version: 0.2.0``), so the embeddings are never all in memory; the
rest of the file is written by anndata itself. Needs the optional ``anndata`` package (which brings ``h5py``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from bio.profiles import FEATURE_PREFIX, open_run
from core.errors import DinoscopeError
from core.io import atomic_path

ANNDATA_FILE = "cells.h5ad"
_BLOCK_BYTES = 64 * 2**20


def require_anndata() -> None:
    """Raise a :class:`DinoscopeError` (before any work) when the ``anndata`` package is not installed."""
    if importlib.util.find_spec("anndata") is None or importlib.util.find_spec("h5py") is None:
        raise DinoscopeError(
            "--format anndata needs the anndata package, which is not installed",
            field="output.format",
            fix="pip install anndata (it brings h5py), or leave --format at zarr",
        )


def write_anndata(run_dir: str | Path) -> Path:
    """Write ``RUN/cells.h5ad`` from a finished run's ``cells.parquet`` and ``embeddings.zarr`` (atomically)."""
    require_anndata()
    # deferred: optional packages (not bio dependencies), needed only for this output format
    anndata = importlib.import_module("anndata")
    h5py = importlib.import_module("h5py")
    run = open_run(run_dir)
    obs = pd.read_parquet(run.cells_path)
    for column in obs.columns:
        if not (pd.api.types.is_numeric_dtype(obs[column]) or pd.api.types.is_bool_dtype(obs[column])):
            obs[column] = obs[column].astype(str).astype("category")
    obs.index = pd.Index([str(i) for i in range(len(obs))], dtype=object)
    var = pd.DataFrame(index=pd.Index([f"{FEATURE_PREFIX}{j}" for j in range(run.dim)], dtype=object))
    attrs = zarr.open_group(run.root / "embeddings.zarr", mode="r").attrs.asdict()  # channels, weights, crops ...
    adata = anndata.AnnData(obs=obs, var=var, uns={"dinoscope": json.dumps(attrs, default=str)})
    target = run.root / ANNDATA_FILE
    with atomic_path(target) as tmp:
        if hasattr(anndata.settings, "allow_write_nullable_strings"):  # pandas >= 3 string columns and indexes
            with anndata.settings.override(allow_write_nullable_strings=True):
                adata.write_h5ad(tmp)
        else:
            adata.write_h5ad(tmp)
        dtype = np.dtype(run.embeddings.dtype)
        rows = max(1, min(run.n_cells, _BLOCK_BYTES // max(1, run.dim * dtype.itemsize)))
        with h5py.File(tmp, "a") as handle:
            x = handle.create_dataset("X", shape=(run.n_cells, run.dim), dtype=dtype, chunks=(rows, run.dim))
            x.attrs["encoding-type"] = "array"
            x.attrs["encoding-version"] = "0.2.0"
            for start in range(0, run.n_cells, rows):
                x[start : start + rows] = np.asarray(run.embeddings[start : start + rows])
    return target
