"""CellProfiler LoadData CSV manifests: one row per site, one TIFF per channel.

Columns follow CellProfiler's LoadData module and the JUMP ``load_data.csv`` files: ``FileName_<Channel>`` (and
optionally ``PathName_<Channel>``; relative paths are relative to the CSV's folder), ``Metadata_Plate``,
``Metadata_Well``, ``Metadata_Site``. The channel name is whatever follows ``FileName_`` (``OrigDNA`` in JUMP).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from bio.io_base import ChannelSource, ChannelStack, Image, channel_indices
from bio.io_tiff import read_tiff
from core.errors import DinoscopeError

METADATA_COLUMNS = ("Metadata_Plate", "Metadata_Well", "Metadata_Site")


@dataclass(frozen=True)
class ManifestField:
    """One site of a manifest: its coordinates, one file per channel, and its line in the CSV (header = line 1)."""

    plate: str
    well: str
    site: str
    channel_paths: dict[str, Path]
    line: int

    @property
    def channel_names(self) -> list[str]:
        """Channel names in the manifest's ``FileName_<channel>`` column order."""
        return list(self.channel_paths)


def read_manifest(csv_path: str | os.PathLike, *, check_files: bool = True) -> list[ManifestField]:
    """Parse a LoadData CSV; with ``check_files`` a missing image raises a DinoscopeError naming its CSV line."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DinoscopeError("manifest not found", path=csv_path, fix="check the path to the LoadData CSV")
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in METADATA_COLUMNS if c not in header]
        channels = [c.removeprefix("FileName_") for c in header if c.startswith("FileName_")]
        if missing or not channels:
            what = f"missing columns {missing}" if missing else "no FileName_<Channel> columns"
            raise DinoscopeError(
                f"not a LoadData manifest: {what}",
                path=csv_path,
                field=", ".join(missing) or None,
                fix="the CSV needs Metadata_Plate, Metadata_Well, Metadata_Site and one "
                "FileName_<Channel> column per channel (PathName_<Channel> optional)",
            )
        fields = [_parse_row(row, line, channels, csv_path, check_files) for line, row in enumerate(reader, start=2)]
    return fields


def iter_manifest_fields(
    csv_path: str | os.PathLike,
    channels: Sequence[str] | None = None,
) -> Iterator[tuple[str, str, str, Image]]:
    """Yield ``(plate, well, site, image)`` per manifest row; only the requested channels' files are opened."""
    for site in read_manifest(csv_path):
        names = site.channel_names
        wanted = names if channels is None else [names[i] for i in channel_indices(names, channels, csv_path)]
        sources = []
        for name in wanted:
            plane = read_tiff(site.channel_paths[name], channel_names=None)
            if len(plane.channel_names) != 1:
                raise DinoscopeError(
                    f"expected one channel per file, found {len(plane.channel_names)}",
                    path=site.channel_paths[name],
                    field=f"FileName_{name}",
                    fix=f"split the file into single-channel TIFFs (manifest line {site.line})",
                )
            sources.append(_renamed(plane, name))
        try:
            stack = ChannelStack(sources)
        except DinoscopeError as exc:
            raise DinoscopeError(
                f"channels of manifest line {site.line} differ in size: {exc.message}",
                path=csv_path,
                fix="every channel file of a site must have the same size",
            ) from exc
        image = Image(
            channel_names=list(wanted), data=stack, path=csv_path, metadata={"format": "loaddata", "line": site.line}
        )
        yield site.plate, site.well, site.site, image


def _renamed(plane: Image, name: str) -> ChannelSource:
    return replace(plane.data.sources[0], name=name)


def _parse_row(
    row: dict[str, str],
    line: int,
    channels: list[str],
    csv_path: Path,
    check_files: bool,
) -> ManifestField:
    paths: dict[str, Path] = {}
    for name in channels:
        file_name = (row.get(f"FileName_{name}") or "").strip()
        if not file_name:
            raise DinoscopeError(
                f"line {line}: empty FileName_{name}",
                path=csv_path,
                field=f"FileName_{name}",
                fix="give every channel a file name on every row",
            )
        folder = Path((row.get(f"PathName_{name}") or "").strip())
        path = Path(file_name) if Path(file_name).is_absolute() else folder / file_name
        if not path.is_absolute():
            path = csv_path.parent / path
        if check_files and not path.is_file():
            raise DinoscopeError(
                f"line {line}: image file {path} does not exist",
                path=csv_path,
                field=f"FileName_{name}",
                fix="fix PathName_/FileName_ on that line, or copy the image there",
            )
        paths[name] = path
    return ManifestField(
        plate=row["Metadata_Plate"],
        well=row["Metadata_Well"],
        site=row["Metadata_Site"],
        channel_paths=paths,
        line=line,
    )
