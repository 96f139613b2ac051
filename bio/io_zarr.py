"""OME-Zarr images and HCS plates: lazy reading (NGFF 0.4 and 0.5) and plate writing.

Layout (NGFF plate/well schemas): ``plate.zarr/{row}/{column}/{field}/{level}``. The plate group lists its wells,
each well group lists its fields; we always follow that metadata and never guess field paths (the hard-coded FOV
names of ome/ome-zarr-py#248). NGFF 0.4 stores attributes in zarr v2 ``.zattrs``; NGFF 0.5 stores them in zarr v3
``zarr.json`` under ``attributes.ome``. Channel names are ``omero.channels[].label``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from bio.io_base import ChannelSource, ChannelStack, Image, ZProjection, resolve_channel_names
from bio.io_tiff import length_in_micrometres
from core.errors import DinoscopeError
from core.io import atomic_path

with warnings.catch_warnings():  # ome-zarr 0.18 builds a deprecated Scaler as a default argument at import
    warnings.simplefilter("ignore", DeprecationWarning)
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_multiscales_metadata, write_plate_metadata, write_well_metadata

_CHANNEL_COLOURS = {"DNA": "0000FF", "ER": "00FF00", "RNA": "FFFF00", "AGP": "FF00FF", "Mito": "FF0000"}
_MAX_CHUNK = 1024


@dataclass(frozen=True)
class WellLayout:
    """One well: its plate coordinates, its group path (``"A/1"``) and its field paths (``("0", "1")``)."""

    row: str
    column: str
    path: str
    fields: tuple[str, ...]


@dataclass(frozen=True)
class PlateLayout:
    """What an HCS plate's metadata declares."""

    path: Path
    name: str | None
    version: str
    rows: list[str]
    columns: list[str]
    wells: list[WellLayout]

    @property
    def n_fields(self) -> int:
        """Fields of view over all wells."""
        return sum(len(w.fields) for w in self.wells)


def ome_attributes(group: Any) -> tuple[dict[str, Any], str]:
    """The NGFF attributes of a zarr group and their version, for both 0.5 (under ``ome``) and 0.4 layouts."""
    attrs = group.attrs.asdict()
    if isinstance(attrs.get("ome"), dict):
        meta = attrs["ome"]
        return meta, str(meta.get("version", "0.5"))
    version = ""
    for key in ("plate", "well"):
        if isinstance(attrs.get(key), dict):
            version = str(attrs[key].get("version", ""))
    if attrs.get("multiscales"):
        version = str(attrs["multiscales"][0].get("version", version))
    return attrs, version or "0.4"


def read_ome_zarr_image(
    path: str | os.PathLike,
    *,
    channel_names: Sequence[str] | None = None,
    z_projection: ZProjection = "first",
    timepoint: int = 0,
) -> Image:
    """Open the full-resolution level of an OME-Zarr multiscale image group lazily."""
    path = Path(path)
    group = _open_group(path)
    meta, version = ome_attributes(group)
    if not meta.get("multiscales"):
        if "plate" in meta:
            fix = "iterate the plate with bio.io.iter_fields, or open one field such as <plate>/A/1/0"
        elif "well" in meta:
            fields = [img.get("path") for img in meta["well"].get("images", [])]
            fix = f"open one of the well's fields: {', '.join(map(str, fields))}"
        else:
            fix = "point at an OME-Zarr image group (it has 'multiscales' metadata)"
        raise DinoscopeError(
            "no 'multiscales' metadata: this is not an OME-Zarr image", path=path, field="multiscales", fix=fix
        )
    multiscale = meta["multiscales"][0]
    level = multiscale["datasets"][0]
    try:
        array = group[level["path"]]
    except KeyError as exc:
        raise DinoscopeError(
            f"resolution level {level['path']!r} listed in the metadata is missing",
            path=path,
            field="multiscales[0].datasets[0].path",
            fix="re-write the image",
        ) from exc
    axes, units = _axes(multiscale, array.ndim, path)
    sizes = dict(zip(axes, array.shape, strict=True))  # _axes checked one letter per dimension
    if timepoint >= sizes.get("t", 1):
        raise DinoscopeError(
            f"timepoint {timepoint} requested but the image has {sizes.get('t', 1)}",
            path=path,
            field="timepoint",
            fix="choose an existing timepoint",
        )
    labels = [ch.get("label") for ch in meta.get("omero", {}).get("channels", [])]
    n_channels = sizes.get("c", 1)
    names = resolve_channel_names(labels if len(labels) == n_channels else [None] * n_channels, channel_names, path)
    sources = [
        ChannelSource(
            array=array,
            axes=axes,
            fixed={"t": timepoint, "c": i, "z": 0},
            project_z=z_projection == "max" and "z" in axes,
            path=str(path),
            name=name,
        )
        for i, name in enumerate(names)
    ]
    return Image(
        channel_names=names,
        data=ChannelStack(sources),
        pixel_size=_pixel_size(multiscale, axes, units),
        path=path,
        metadata={"format": "ome-zarr", "version": version, "axes": axes},
    )


def read_plate_layout(plate_path: str | os.PathLike) -> PlateLayout:
    """Read plate and well metadata; a listed well that is missing on disk raises a DinoscopeError."""
    plate_path = Path(plate_path)
    meta, version = ome_attributes(_open_group(plate_path))
    plate = meta.get("plate")
    if not isinstance(plate, dict) or not plate.get("wells"):
        raise DinoscopeError(
            "no 'plate' metadata with wells: not an OME-Zarr HCS plate",
            path=plate_path,
            field="plate",
            fix="point at the plate root (the group holding the row folders), or "
            "open a single image with bio.io.read_image",
        )
    rows = [r["name"] for r in plate.get("rows", [])]
    columns = [c["name"] for c in plate.get("columns", [])]
    wells = []
    for i, entry in enumerate(plate["wells"]):
        well_path = str(entry["path"])
        if "rowIndex" in entry and "columnIndex" in entry and rows and columns:
            row, column = rows[entry["rowIndex"]], columns[entry["columnIndex"]]
        else:
            row, column = well_path.split("/")[:2]
        try:
            well_meta, _ = ome_attributes(_open_group(plate_path / well_path))
        except DinoscopeError as exc:
            raise DinoscopeError(
                f"well {well_path!r} is listed in the plate metadata but missing on disk",
                path=plate_path,
                field=f"plate.wells[{i}].path",
                fix="restore the well folder, or remove the well from the plate metadata",
            ) from exc
        images = well_meta.get("well", {}).get("images")
        if not images:
            raise DinoscopeError(
                "well group has no 'well.images' metadata",
                path=plate_path / well_path,
                field="well.images",
                fix="write the well metadata listing its fields",
            )
        wells.append(
            WellLayout(
                row=str(row), column=str(column), path=well_path, fields=tuple(str(img["path"]) for img in images)
            )
        )
    return PlateLayout(
        path=plate_path, name=plate.get("name"), version=version, rows=rows, columns=columns, wells=wells
    )


def iter_plate_fields(
    plate_path: str | os.PathLike,
    channels: Sequence[str] | None = None,
    **options: Any,
) -> Iterator[tuple[str, str, str, Image]]:
    """Yield ``(row, column, field, image)`` per field, each opened only when reached."""
    layout = read_plate_layout(plate_path)
    for well in layout.wells:
        for field_path in well.fields:
            image = read_ome_zarr_image(layout.path / well.path / field_path, **options)
            yield well.row, well.column, field_path, image.select(channels)


def write_plate(
    path: str | os.PathLike,
    images: Mapping[tuple[str, str, str], Any] | Iterable[tuple[tuple[str, str, str], Any]],
    channel_names: Sequence[str],
    *,
    version: Literal["0.4", "0.5"] = "0.5",
    plate_name: str | None = None,
    pixel_size: float | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an HCS plate field by field (memory holds one field at a time); see :func:`bio.io.write_ome_zarr_plate`.

    All NGFF metadata (plate, well, multiscales, omero) is written by ome-zarr's writer for the chosen format, so the
    0.4/0.5 differences (``.zattrs`` vs ``zarr.json`` under ``ome``, where ``version`` goes) are its business. The
    pixel arrays are created with zarr directly rather than ``ome_zarr.writer.write_image``/``write_multiscale``:
    those name levels ``s0, s1, ...`` (ours stay ``0``, as in plates already written) and route every field through
    dask, where we write one channel at a time so lazy inputs are never loaded whole.
    """
    path = Path(path)
    if version not in ("0.4", "0.5"):
        raise DinoscopeError(f"unsupported NGFF version {version!r}", field="version", fix="use '0.4' or '0.5'")
    if path.exists() and not overwrite:
        raise DinoscopeError("output already exists", path=path, fix="choose a new path or pass overwrite=True")
    fmt = FormatV04() if version == "0.4" else FormatV05()
    items = images.items() if isinstance(images, Mapping) else images
    wells: dict[tuple[str, str], list[str]] = {}
    well_groups: dict[tuple[str, str], zarr.Group] = {}
    with atomic_path(path, is_dir=True) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=fmt.zarr_format)
        for (row, column, field_path), data in items:
            row, column, field_path = str(row), str(column), str(field_path)
            fields = wells.setdefault((row, column), [])
            if field_path in fields:
                raise DinoscopeError(
                    f"field {row}/{column}/{field_path} given twice",
                    path=path,
                    fix="give each (row, column, field) once",
                )
            fields.append(field_path)
            if (row, column) not in well_groups:
                well_groups[row, column] = root.require_group(row).require_group(column)
            group = well_groups[row, column].create_group(field_path)
            dtype = _write_pixels(group, data, channel_names, path)
            write_multiscales_metadata(
                group, fmt=fmt, **_multiscale_metadata(group.path, channel_names, dtype, pixel_size)
            )
        if not wells:
            raise DinoscopeError("no images to write", path=path, fix="pass at least one field")
        for (row, column), fields in wells.items():
            write_well_metadata(well_groups[row, column], list(fields), fmt=fmt)
        rows = sorted({r for r, _ in wells}, key=lambda r: (len(r), r))
        columns = sorted({c for _, c in wells}, key=lambda c: (0, int(c), c) if c.isdigit() else (1, 0, c))
        well_paths = [f"{r}/{c}" for r, c in sorted(wells, key=lambda rc: (rows.index(rc[0]), columns.index(rc[1])))]
        write_plate_metadata(
            root,
            rows,
            columns,
            well_paths,
            fmt=fmt,
            field_count=max(map(len, wells.values())),
            name=plate_name or path.name.removesuffix(".zarr").removesuffix(".ome"),
        )
    return path


def _write_pixels(group: zarr.Group, data: Any, channel_names: Sequence[str], plate_path: Path) -> np.dtype:
    """Write level ``0`` of one field, a C x Y x X array chunked per channel; returns its dtype."""
    shape = tuple(data.shape)
    if len(shape) != 3 or shape[0] != len(channel_names):
        raise DinoscopeError(
            f"field {group.path} has shape {shape}, expected C x Y x X with C = {len(channel_names)}",
            path=plate_path,
            field=group.path,
            fix="pass one C x Y x X array per field, channels first",
        )
    chunks = (1, min(shape[1], _MAX_CHUNK), min(shape[2], _MAX_CHUNK))
    # NGFF 0.4 (zarr v2) arrays use "/" chunk keys as the spec requires; 0.5 (zarr v3) arrays name their dimensions
    layout: dict[str, Any] = (
        {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
        if group.metadata.zarr_format == 2
        else {"dimension_names": ["c", "y", "x"]}
    )
    dtype = np.dtype(data.dtype)
    array = group.create_array("0", shape=shape, dtype=dtype, chunks=chunks, **layout)
    if isinstance(data, np.ndarray):
        array[...] = data
    else:
        for c in range(shape[0]):  # one channel at a time keeps lazy inputs from being loaded whole
            array[c] = np.asarray(data[c])
    return dtype


def _multiscale_metadata(
    name: str,
    channel_names: Sequence[str],
    dtype: np.dtype,
    pixel_size: float | None,
) -> dict[str, Any]:
    """Keyword arguments of ``ome_zarr.writer.write_multiscales_metadata`` for one single-level C x Y x X field."""
    top = float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0
    omero = {
        "channels": [
            {
                "label": str(name),
                "color": _CHANNEL_COLOURS.get(str(name), "FFFFFF"),
                "active": True,
                "window": {"min": 0.0, "max": top, "start": 0.0, "end": top},
            }
            for name in channel_names
        ]
    }
    size = float(pixel_size or 1.0)
    unit = {"unit": "micrometer"} if pixel_size is not None else {}
    axes = [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", **unit},
        {"name": "x", "type": "space", **unit},
    ]  # axis dicts, not axes_units=: that keyword is recent in ome-zarr
    return {
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, size, size]}]}],
        "axes": axes,
        "name": name,
        "metadata": {"omero": omero},
    }


def _open_group(path: Path) -> Any:
    if not path.exists():
        raise DinoscopeError("zarr group not found", path=path, fix="check the path")
    # A zarr v3 group says so in its zarr.json; naming the format spares zarr probing for the v2 files as well (about
    # 40 % of opening a group, paid for every field of a plate).
    zarr_format = 3 if (path / "zarr.json").is_file() else None
    try:
        return zarr.open_group(str(path), mode="r", zarr_format=zarr_format)
    except Exception as exc:  # noqa: BLE001 - zarr raises several types for "not a group"
        raise DinoscopeError(
            f"not a readable zarr group ({type(exc).__name__}: {exc})",
            path=path,
            fix="point at an OME-Zarr group (it holds zarr.json or .zgroup/.zattrs)",
        ) from exc


def _axes(multiscale: Mapping[str, Any], ndim: int, path: Path) -> tuple[str, dict[str, str]]:
    """Axis letters (``c`` for the channel axis, ``t`` for time) and the unit of each spatial axis."""
    declared = multiscale.get("axes") or list("tczyx"[-ndim:])  # NGFF <= 0.2 had no axes: always t,c,z,y,x
    letters, units = [], {}
    for axis in declared:
        if isinstance(axis, str):
            axis = {"name": axis}
        kind = axis.get("type")
        letter = "c" if kind == "channel" else "t" if kind == "time" else str(axis["name"]).lower()
        letters.append(letter)
        if axis.get("unit"):
            units[letter] = axis["unit"]
    axes = "".join(letters)
    if len(axes) != ndim or not {"y", "x"} <= set(axes):
        raise DinoscopeError(
            f"axes {letters} do not fit a {ndim}-d array with y and x",
            path=path,
            field="multiscales[0].axes",
            fix="fix the axes metadata to name every dimension",
        )
    return axes, units


def _pixel_size(multiscale: Mapping[str, Any], axes: str, units: Mapping[str, str]) -> float | None:
    scale = 1.0
    found = False
    transforms = list(multiscale["datasets"][0].get("coordinateTransformations", []))
    transforms += list(multiscale.get("coordinateTransformations", []))
    for transform in transforms:
        if transform.get("type") == "scale" and "scale" in transform:
            scale *= float(transform["scale"][axes.index("x")])
            found = True
    if not found or "x" not in units:
        return None
    return length_in_micrometres(scale, units["x"])
