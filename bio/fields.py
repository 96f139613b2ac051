"""Fields of view of cell-painting screens and their nuclei, shared by ``dinoscope cells embed`` (:mod:`bio.embed`)
and pretraining (:mod:`bio.pretrain_data`):

* :func:`list_fields` numbers every field of OME-Zarr plates, LoadData manifests and multi-channel (OME-)TIFF files
  (single files, folders, image lists: :mod:`bio.fields_files`) from metadata and file names alone;
  :func:`open_fields` opens the requested ones, one at a time, with channels renamed by the run's channel map.
* :class:`CentroidFinder` gives each field's nucleus centroids and cell ids from a CellProfiler table, an instance
  label image, or built-in detection (:mod:`bio.cells`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bio.cells import X_COLUMN, Y_COLUMN, centroids_from_labels, centroids_from_table, detect_nuclei
from bio.fields_files import (
    DEFAULT_NAME_PATTERN,
    image_list_fields,
    is_image_list,
    is_tiff,
    is_tiff_folder,
    tiff_fields,
)
from bio.io import Image, iter_manifest_fields, plate_layout, read_image, read_manifest, well_name
from bio.profiles import normalise_well_name
from core.errors import DinoscopeError

CENTROID_METHODS = ("detect", "table", "labels")
_TABLE_KEYS = ("plate", "well", "site")
_ID_COLUMNS = ("ObjectNumber", "Nuclei_Number_Object_Number")


@dataclass(frozen=True)
class FieldInfo:
    """One field of view: its number in the run, plate coordinates, and where it is stored.

    ``path`` is the field's zarr group for plates and its file for TIFF sources; ``None`` for a manifest row (opened
    through the manifest). ``channel_map`` renames the source's channels (``(("OrigDNA", "DNA"), ...)``).
    """

    index: int
    plate: str
    well: str
    site: str
    source: Path
    path: Path | None
    channel_map: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        """``plate/well/site``: the field's unique name within a run."""
        return f"{self.plate}/{self.well}/{self.site}"


def list_fields(
    sources: Sequence[str | os.PathLike],
    *,
    channel_map: Mapping[str, str] | None = None,
    name_pattern: str = DEFAULT_NAME_PATTERN,
) -> list[FieldInfo]:
    """Every field of the given sources, numbered in source order.

    Args:
        sources: OME-Zarr plate roots, LoadData CSVs, image-list CSVs, (OME-)TIFF files and folders of them.
        channel_map: ``{name in the source: name to use}`` (a manifest's names are its ``FileName_`` suffixes).
        name_pattern: how TIFF file names give plate, well and site (:mod:`bio.fields_files`).
    """
    renames = tuple(sorted((channel_map or {}).items()))
    if isinstance(sources, (str, os.PathLike)) or not sources:
        sources = [sources] if isinstance(sources, (str, os.PathLike)) else []
    if not sources:
        raise DinoscopeError(
            "no input plates or manifests given",
            field="sources",
            fix="pass OME-Zarr plate roots and/or LoadData CSV files",
        )
    fields: list[FieldInfo] = []
    for source in map(Path, sources):
        before = len(fields)
        files = None
        if source.suffix.lower() == ".csv" and is_image_list(source):
            files = image_list_fields(source)
        elif is_tiff(source) or is_tiff_folder(source):
            if not source.exists():
                raise DinoscopeError("input not found", path=source, field="sources", fix="check the path")
            files = tiff_fields(source, name_pattern)
        if files is not None:
            for plate, well, site, file in files:
                fields.append(FieldInfo(len(fields), plate, well, site, source, file, renames))
        elif source.suffix.lower() == ".csv":
            for site in read_manifest(source, check_files=False, channel_map=channel_map):
                fields.append(FieldInfo(len(fields), site.plate, site.well, site.site, source, None, renames))
        else:
            layout = plate_layout(source)
            plate = layout.name or source.name.removesuffix(".zarr").removesuffix(".ome")
            for well in layout.wells:
                for field in well.fields:
                    fields.append(
                        FieldInfo(
                            len(fields),
                            plate,
                            well_name(well.row, well.column),
                            field,
                            source,
                            source / well.path / field,
                            renames,
                        )
                    )
        if len(fields) == before:
            raise DinoscopeError(
                "the manifest lists no site (a header but no rows)",
                path=source,
                field="sources",
                fix="list one site per row, or leave the manifest out",
            )
    seen: dict[str, FieldInfo] = {}
    for field in fields:
        if field.key in seen:
            raise DinoscopeError(
                f"field {field.key} appears twice (in {seen[field.key].source} and {field.source})",
                path=field.source,
                field="plate",
                fix="give every plate a distinct name; pass each source once",
            )
        seen[field.key] = field
    return fields


def field_channel_names(field: FieldInfo) -> list[str]:
    """The channel names of a field (after its channel map), read from its metadata."""
    if field.path is None:
        return read_manifest(field.source, check_files=False, channel_map=dict(field.channel_map))[0].channel_names
    with open_field_image(field) as image:
        return list(image.channel_names)


def open_field_image(field: FieldInfo) -> Image:
    """Open a plate field or TIFF file lazily, its channels renamed by the field's channel map."""
    image = read_image(field.path)
    try:
        return image.renamed(dict(field.channel_map))
    except DinoscopeError:
        image.close()
        raise


def open_fields(fields: Sequence[FieldInfo], wanted: set[int]) -> Iterator[tuple[FieldInfo, Image]]:
    """Open the ``wanted`` fields (by index) one at a time, in index order; the caller closes each image."""
    manifest_rows: dict[Path, Iterator[tuple[str, str, str, Image]]] = {}
    for field in fields:
        if field.path is not None:
            if field.index in wanted:
                yield field, open_field_image(field)
            continue
        rows = manifest_rows.setdefault(
            field.source, iter_manifest_fields(field.source, channel_map=dict(field.channel_map))
        )
        _, _, _, image = next(rows)  # manifest rows come in field order: step through to reach this one
        if field.index in wanted:
            yield field, image
        else:
            image.close()


class CentroidFinder:
    """Nucleus centroids ``(y, x)`` and cell ids of one field.

    Args:
        method: ``detect``, ``table`` or ``labels`` (see :func:`bio.embed.embed_plate`).
        nuclei_table: CellProfiler nuclei CSV for ``table`` (``Nuclei_Location_Center_X/Y`` and ``well`` plus
            optionally ``plate`` and ``site`` columns, or ``Metadata_Well`` ...; ``ObjectNumber`` as cell id).
        label_channel: instance-mask channel name for ``labels``.
        detect_channel: nuclear stain for ``detect``.
    """

    def __init__(
        self,
        method: str,
        *,
        nuclei_table: str | os.PathLike | None = None,
        label_channel: str | None = None,
        detect_channel: str = "DNA",
    ) -> None:
        if method not in CENTROID_METHODS:
            raise DinoscopeError(
                f"unknown centroid source {method!r}",
                field="centroids",
                fix=f"use one of {', '.join(CENTROID_METHODS)}",
            )
        if method == "table" and not nuclei_table:
            raise DinoscopeError(
                "centroids 'table' needs a nuclei table",
                field="nuclei_table",
                fix="pass --nuclei-table nuclei.csv (CellProfiler Nuclei_Location_Center_X/Y)",
            )
        if method == "labels" and not label_channel:
            raise DinoscopeError(
                "centroids 'labels' needs the label image's name",
                field="label_channel",
                fix="pass --label-channel NAME (a mask channel, or an NGFF labels/NAME image)",
            )
        self.method, self.table_path = method, nuclei_table
        self.label_channel, self.detect_channel = label_channel, detect_channel
        self._table: dict[tuple[str, ...], np.ndarray] = {}
        if method == "table":
            self._load_table(Path(nuclei_table))

    def describe(self) -> dict[str, Any]:
        """The settings that determine the centroids (recorded in the run config, so a resume can check them)."""
        return {
            "method": self.method,
            "nuclei_table": str(self.table_path) if self.table_path else None,
            "label_channel": self.label_channel,
            "detect_channel": self.detect_channel if self.method == "detect" else None,
        }

    def _load_table(self, path: Path) -> None:
        """Index the table once by field; only the location, id and metadata columns are read."""
        wanted = {
            X_COLUMN.lower(),
            Y_COLUMN.lower(),
            *map(str.lower, _ID_COLUMNS),
            *_TABLE_KEYS,
            *(f"metadata_{k}" for k in _TABLE_KEYS),
        }
        try:
            frame = pd.read_csv(path, usecols=lambda column: str(column).lower() in wanted)
        except (OSError, ValueError) as err:
            raise DinoscopeError(
                f"cannot read the nuclei table ({err})", path=path, fix="pass a CSV exported from CellProfiler"
            ) from None
        lower = {str(c).lower(): str(c) for c in frame.columns}
        columns = {k: lower.get(f"metadata_{k}", lower.get(k)) for k in _TABLE_KEYS}
        self._keys = [k for k in _TABLE_KEYS if columns[k]]
        if "well" not in self._keys:
            raise DinoscopeError(
                "the nuclei table has no well column",
                path=path,
                field="well",
                fix="add Metadata_Well (or well), and plate / site columns for several of each",
            )
        for column in (X_COLUMN, Y_COLUMN):
            if column not in frame.columns:
                raise DinoscopeError(
                    f"the nuclei table has no column {column!r}",
                    path=path,
                    field=column,
                    fix="export nuclei locations from CellProfiler (Nuclei_Location_Center_X/Y)",
                )
        frame = frame[np.isfinite(frame[[X_COLUMN, Y_COLUMN]].to_numpy(np.float64)).all(axis=1)]
        self._centres = centroids_from_table(frame)
        id_column = next((c for c in _ID_COLUMNS if c in frame.columns), None)
        self._ids = frame[id_column].to_numpy(np.int64) if id_column else np.zeros(len(frame), np.int64)
        keys = pd.DataFrame({k: frame[columns[k]].astype(str).to_numpy() for k in self._keys})
        names, inverse = np.unique(keys["well"].to_numpy(str), return_inverse=True)  # a few hundred distinct wells
        keys["well"] = np.array([_normalised_well(name) for name in names], dtype=object)[inverse.ravel()]
        self._table = {
            (k if isinstance(k, tuple) else (k,)): rows
            for k, rows in keys.groupby(self._keys, sort=False).indices.items()
        }
        if id_column is None:  # number cells 1..n within each field, like CellProfiler
            for rows in self._table.values():
                self._ids[rows] = np.arange(1, len(rows) + 1)

    def table_key(self, field: FieldInfo) -> tuple[str, ...]:
        """The field's key in the nuclei table: its values of the table's columns among plate, well, site."""
        well = _normalised_well(field.well)
        return tuple({"plate": field.plate, "well": well, "site": field.site}[k] for k in self._keys)

    def table_keys(self) -> tuple[list[str], list[tuple[str, ...]]]:
        """The nuclei table's key columns (among plate, well, site) and its distinct keys, in table order."""
        return list(self._keys), list(self._table)

    def find(
        self, field: FieldInfo, image: Image, data: np.ndarray | None = None, names: Sequence[str] = ()
    ) -> tuple[np.ndarray, np.ndarray]:
        """Centroids ``[n, 2]`` and ids ``[n]``; ``data``/``names`` are the already read channels, to reuse."""
        if self.method == "table":
            rows = self._table.get(self.table_key(field), np.zeros(0, np.int64))
            return self._centres[rows], self._ids[rows]
        if self.method == "detect":
            plane = (
                data[list(names).index(self.detect_channel)]
                if data is not None and self.detect_channel in names
                else image.channel(self.detect_channel)
            )
            centres = detect_nuclei(plane)
            return centres, np.arange(1, len(centres) + 1, dtype=np.int64)
        labels = self._label_image(field, image)
        return centroids_from_labels(labels), np.unique(labels[labels > 0]).astype(np.int64)

    def _label_image(self, field: FieldInfo, image: Image) -> np.ndarray:
        name = self.label_channel
        if name in image.channel_names:
            return np.asarray(image.channel(name))
        ngff = field.path / "labels" / name if field.path is not None else None
        if ngff is None or not ngff.exists():
            raise DinoscopeError(
                f"no label image {name!r}: not a channel ({', '.join(image.channel_names)}) and no NGFF labels group",
                path=ngff or field.source,
                field="label_channel",
                fix="add the masks as a channel (FileName_<name> in a manifest) or under <field>/labels/<name>",
            )
        with read_image(ngff) as labels:
            return np.asarray(labels.data[0])


@functools.lru_cache(maxsize=4096)
def _normalised_well(well: str) -> str:
    """:func:`bio.profiles.normalise_well_name`, remembered: every field of a run asks for its well's table key."""
    return normalise_well_name(well)
