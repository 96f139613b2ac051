"""The ``INPUT`` of every curation stage: embeddings with their ids, item metadata and source datasets.

``INPUT`` is either a ``dinoscope curate embed`` run directory (``embeddings.zarr`` + ``ids.parquet``, see
:mod:`core.curate.embed`) or a plain ``N x D`` float ``.npy`` array whose row indices are the ids. A ``.npy`` is
memory-mapped and a run's zarr array read block by block; blocks are normalised as they are read
(:func:`load_vectors`), so one float32 copy of the vectors is all a stage holds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.data.manifest import Manifest, read_manifest
from core.errors import DinoscopeError

RUN_EMBEDDINGS = "embeddings.zarr"
RUN_IDS = "ids.parquet"
META_COLUMNS = ("source", "item", "path", "window", "cell")
_INPUT_FIX = "give a `dinoscope curate embed` run directory or an N x D float .npy array"


@dataclass
class Collection:
    """Embeddings and what is known about their items.

    Attributes:
        vectors: ``N x D`` float array (a memory map for ``.npy``, a zarr array for a run); row ``i`` embeds item
            ``ids[i]``.
        ids: ``N`` int64 item ids.
        columns: per-row metadata arrays among :data:`META_COLUMNS` (those that are known).
        sources: the dataset kinds of a ``curate embed`` run (``[{kind, params}]``), ``None`` for a ``.npy``.
        where: the input path, for messages and reports.
    """

    vectors: Any
    ids: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    sources: list[dict[str, Any]] | None = None
    where: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        """Embedding width ``D``."""
        return int(self.vectors.shape[1])

    def take(self, rows: np.ndarray) -> Collection:
        """The rows ``rows`` (indices into this collection), vectors loaded into memory."""
        rows = np.asarray(rows, dtype=np.int64)
        picked = self.vectors.oindex[rows] if hasattr(self.vectors, "oindex") else self.vectors[rows]  # zarr / numpy
        vectors = np.asarray(picked, dtype=np.float32).reshape(len(rows), self.dim)
        return Collection(
            vectors, self.ids[rows], {k: v[rows] for k, v in self.columns.items()}, self.sources, self.where
        )

    def manifest_columns(self, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``id`` plus the known metadata columns, for the rows ``rows`` (all by default)."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        return {"id": self.ids[rows], **{k: v[rows] for k, v in self.columns.items()}}


def open_collection(path: str | os.PathLike, *, field_name: str = "input") -> Collection:
    """Open an ``INPUT``: a ``curate embed`` run directory or an ``N x D`` ``.npy`` array."""
    path = Path(path)
    if path.is_dir():
        if not (path / RUN_EMBEDDINGS).exists() or not (path / RUN_IDS).exists():
            raise DinoscopeError(
                f"the directory holds no {RUN_EMBEDDINGS} + {RUN_IDS} (an unfinished or foreign run?)",
                path=path,
                field=field_name,
                fix=_INPUT_FIX,
            )
        return _open_run(path)
    if path.suffix.lower() == ".npy" and path.is_file():
        return _open_npy(path, field_name)
    raise DinoscopeError("not an embedding run directory or .npy file", path=path, field=field_name, fix=_INPUT_FIX)


def _open_npy(path: Path, field_name: str) -> Collection:
    try:
        vectors = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise DinoscopeError(f"the .npy cannot be read ({err})", path=path, field=field_name, fix=_INPUT_FIX) from None
    if vectors.ndim != 2 or vectors.dtype.kind != "f" or not len(vectors):
        raise DinoscopeError(
            f"expected a non-empty N x D float array, got shape {vectors.shape} of {vectors.dtype}",
            path=path,
            field=field_name,
            fix=_INPUT_FIX,
        )
    return Collection(vectors, np.arange(len(vectors), dtype=np.int64), where=str(path))


def require_zarr() -> Any:
    """The ``zarr`` module, or a :class:`DinoscopeError` saying how to install it."""
    # deferred: zarr is an optional dependency (the curate extra), needed only for embedding runs
    try:
        import zarr
    except ImportError:
        raise DinoscopeError("embedding runs need zarr", fix="pip install 'dinoscope[curate]'") from None
    return zarr


def _open_run(path: Path) -> Collection:
    vectors = require_zarr().open_group(path / RUN_EMBEDDINGS, mode="r")["embeddings"]  # read block by block when used
    table = read_manifest(path / RUN_IDS)
    if len(table) != vectors.shape[0]:
        raise DinoscopeError(
            f"{RUN_IDS} has {len(table)} rows but {RUN_EMBEDDINGS} {vectors.shape[0]}",
            path=path,
            fix="embed the collection again (--no-resume)",
        )
    columns = {k: table.columns[k] for k in META_COLUMNS if k in table.columns}
    return Collection(vectors, table.ids, columns, table.sources, str(path))


def restrict(collection: Collection, manifest_path: str | os.PathLike) -> tuple[Collection, Manifest]:
    """The items of ``collection`` whose ids a manifest selects (its ``keep`` rows when it has that column)."""
    manifest = read_manifest(manifest_path).kept()
    rows = rows_of_ids(collection.ids, manifest.ids, where=manifest_path)
    return collection.take(np.sort(rows)), manifest


def rows_of_ids(ids: np.ndarray, wanted: np.ndarray, *, where: Any = None) -> np.ndarray:
    """Row indices of ``wanted`` ids in ``ids``; an id that is not there is a :class:`DinoscopeError`."""
    order = np.argsort(ids, kind="stable")
    pos = np.searchsorted(ids, wanted, sorter=order)
    pos = np.minimum(pos, len(ids) - 1)
    rows = order[pos]
    missing = ids[rows] != wanted
    if missing.any():
        raise DinoscopeError(
            f"{int(missing.sum())} ids of the manifest are not in the input (first: {int(wanted[missing][0])})",
            path=where,
            field="subset",
            fix="use a manifest curated from the same INPUT",
        )
    return rows


def normalized(block: np.ndarray) -> np.ndarray:
    """A float32 copy of ``block`` with unit-length rows (zero rows stay zero)."""
    block = np.asarray(block, dtype=np.float32)
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return block / np.maximum(norms, 1e-12)


def load_vectors(collection: Collection, *, normalize: bool, block: int = 65536) -> np.ndarray:
    """The collection's vectors as one float32 array, L2-normalised block by block when ``normalize``."""
    out = np.empty((len(collection), collection.dim), dtype=np.float32)
    for start, stop in blocks(len(collection), block):
        chunk = np.asarray(collection.vectors[start:stop], dtype=np.float32)
        out[start:stop] = normalized(chunk) if normalize else chunk
    if not np.isfinite(out).all():
        raise DinoscopeError(
            "the embeddings contain NaN or infinite values", path=collection.where, fix="embed the collection again"
        )
    return out


def blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive blocks of ``size`` rows covering ``range(n)``."""
    for start in range(0, n, max(1, size)):
        yield start, min(n, start + size)
