"""Manifests of curated items (Parquet) and the ``data.kind: manifest`` dataset that pretrains on them.

A manifest is a Parquet table with an ``id`` column (int64) and, when known, ``path``, ``window`` (pixel window
``"col,row,width,height"``), ``cell`` (nucleus centre ``"y,x"``), ``source`` and ``item`` (which dataset of the
collection, and which item of it). ``dinoscope curate`` writes them (:mod:`core.curate`), as in DINOv2's curated
LVD-142M (Oquab et al. 2023, section 3), which is an index into the uncurated pool rather than a copy of the images.

The table's key-value metadata ``dinoscope.manifest`` holds JSON with the dataset kinds the items come from
(``sources``: ``[{"kind": ..., "params": {...}}]``, one per ``source`` value), so the pretraining dataset rebuilds
them through the dataset-kind registry (:func:`core.data.datasets.build_dataset`) and serves item ``item`` of dataset
``source`` for every row. Without sources the dataset reads each row's ``path`` (cropped to its ``window``); a
manifest from a plain ``.npy`` has neither, so its recipe names the sources (``data.params.sources``).

A ``keep`` column, when present (``dedup.parquet``), selects the rows whose ``keep`` is true::

    data:
      kind: manifest
      params: {manifest: curated/sample.parquet}
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from core.data.images import read_image
from core.errors import DinoscopeError
from core.io import atomic_path
from core.weights.meta import default_channel_names

META_KEY = b"dinoscope.manifest"
FORMAT = "dinoscope.manifest/1"
_FIX_PYARROW = "install pyarrow (pip install 'dinoscope[curate]')"


def _pyarrow() -> tuple[Any, Any]:
    # deferred: pyarrow is an optional, heavy dependency that importing core.data must not load
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DinoscopeError("reading and writing manifests needs pyarrow", fix=_FIX_PYARROW) from None
    return pa, pq


@dataclass
class Manifest:
    """A manifest in memory: its columns (numpy arrays, ``id`` first), its sources and free-form info."""

    columns: dict[str, np.ndarray]
    sources: list[dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ids(self) -> np.ndarray:
        """The ``id`` column (int64)."""
        return self.columns["id"]

    def __len__(self) -> int:
        return len(self.ids)

    def kept(self) -> Manifest:
        """The rows whose ``keep`` is true (all rows without a ``keep`` column)."""
        if "keep" not in self.columns:
            return self
        mask = self.columns["keep"].astype(bool)
        return Manifest({k: v[mask] for k, v in self.columns.items()}, self.sources, self.info)


def write_manifest(
    path: str | os.PathLike,
    columns: Mapping[str, Sequence[Any] | np.ndarray],
    *,
    sources: list[dict[str, Any]] | None = None,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write a manifest: ``columns`` must include ``id``; string columns may hold ``None`` (null).

    Args:
        path: the ``.parquet`` file to write.
        columns: name -> values, all of one length; ``id`` goes first.
        sources: the dataset kinds the items come from (see the module docstring).
        info: JSON-serialisable provenance stored next to the sources (stage, settings, counts).
    """
    pa, pq = _pyarrow()
    if "id" not in columns:
        raise ValueError("a manifest needs an `id` column")
    names = ["id", *[name for name in columns if name != "id"]]
    arrays = {name: _arrow_column(pa, name, columns[name]) for name in names}
    meta = {"format": FORMAT, "sources": sources, **(dict(info) if info else {})}
    table = pa.table(arrays).replace_schema_metadata({META_KEY: json.dumps(meta, default=str).encode()})
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def _arrow_column(pa: Any, name: str, values: Sequence[Any] | np.ndarray) -> Any:
    if name in ("id", "source", "item"):
        return pa.array(np.asarray(values, dtype=np.int64))
    array = np.asarray(values)
    if array.dtype.kind in "biuf":
        return pa.array(array)
    return pa.array([None if v is None or v == "" else str(v) for v in array.tolist()], type=pa.string())


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read a manifest written by :func:`write_manifest` (or any Parquet table with an integer ``id`` column)."""
    _, pq = _pyarrow()
    path = Path(path)
    if not path.is_file():
        raise DinoscopeError("the manifest does not exist", path=path, fix="give a .parquet written by `curate`")
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for foreign or truncated files
        raise DinoscopeError(
            f"not a readable Parquet table ({type(err).__name__})", path=path, fix="give a .parquet manifest"
        ) from None
    if "id" not in table.column_names:
        raise DinoscopeError(
            "the manifest has no `id` column", path=path, field="id", fix="give a manifest written by `curate`"
        )
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    try:
        columns["id"] = columns["id"].astype(np.int64, casting="safe")
    except TypeError:
        raise DinoscopeError("the `id` column is not integer", path=path, field="id") from None
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    sources = meta.pop("sources", None)
    meta.pop("format", None)
    return Manifest(columns, sources, meta)


def parse_window(text: Any) -> tuple[int, int, int, int] | None:
    """``"col,row,width,height"`` -> a tuple of ints; ``None`` for a missing window."""
    if text is None or text == "" or (isinstance(text, float) and np.isnan(text)):
        return None
    col, row, width, height = (int(float(part)) for part in str(text).split(","))
    return col, row, width, height


class ManifestDataset(Dataset):
    """The rows of a manifest as images (``H x W x C`` arrays, the dataset contract of :mod:`core.data`).

    Args:
        manifest: the manifest (rows with ``keep`` false are dropped).
        datasets: the collection's datasets, one per ``source`` value; row ``i`` is ``datasets[source][item]``
            (``source`` defaults to 0 and ``item`` to the row's id). ``None``: read each row's ``path`` instead.
        where: the manifest file, named in errors.
    """

    def __init__(
        self, manifest: Manifest, datasets: Sequence[Dataset] | None = None, where: str | os.PathLike | None = None
    ) -> None:
        manifest = manifest.kept()
        if not len(manifest):
            raise DinoscopeError("the manifest selects no item", path=where, fix="curate a non-empty manifest")
        self.ids = manifest.ids
        self.datasets = list(datasets) if datasets else None
        if self.datasets is not None:
            self.source = manifest.columns.get("source", np.zeros(len(self.ids), np.int64)).astype(np.int64)
            self.item = manifest.columns.get("item", self.ids).astype(np.int64)
            self._check_rows(where)
            self.channel_names = list(self.datasets[0].channel_names)
            return
        if "path" not in manifest.columns:
            raise DinoscopeError(
                "the manifest records neither the dataset kinds its items come from nor their paths",
                path=where,
                field="sources",
                fix="give data.params.sources: [{kind: ..., params: {...}}], the collection that was embedded",
            )
        self.paths = manifest.columns["path"]
        self.windows = manifest.columns.get("window")
        self.channel_names = default_channel_names(self[0].shape[-1])

    def _check_rows(self, where: str | os.PathLike | None) -> None:
        if self.source.min() < 0 or self.source.max() >= len(self.datasets):
            raise DinoscopeError(
                f"the manifest refers to source {int(self.source.max())}, but {len(self.datasets)} are given",
                path=where,
                field="sources",
                fix="give one source per dataset of the embedded collection, in its order",
            )
        for index, dataset in enumerate(self.datasets):
            items = self.item[self.source == index]
            if len(items) and (items.min() < 0 or items.max() >= len(dataset)):
                raise DinoscopeError(
                    f"the manifest refers to item {int(items.max())} of source {index}, which has {len(dataset)}",
                    path=where,
                    field="sources",
                    fix="rebuild the sources with the parameters the collection was embedded with",
                )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self.datasets is not None:
            item = self.datasets[int(self.source[index])][int(self.item[index])]
            return item[0] if isinstance(item, tuple) else item
        image = read_image(str(self.paths[index]))
        window = parse_window(self.windows[index]) if self.windows is not None else None
        if window is not None:
            col, row, width, height = window
            image = image[row : row + height, col : col + width]
        return image
