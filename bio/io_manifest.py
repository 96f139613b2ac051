"""CellProfiler LoadData CSV manifests: one row per site, one TIFF per channel.

Columns follow CellProfiler's LoadData module and the JUMP ``load_data.csv`` files: ``FileName_<Channel>`` (and
optionally ``PathName_<Channel>``; relative paths are relative to the CSV's folder), ``Metadata_Plate``,
``Metadata_Well``, ``Metadata_Site``.

Channel names, the rule: the name is what follows ``FileName_``, less JUMP's ``Orig`` prefix of raw images
(``FileName_OrigDNA`` -> ``DNA``, ``FileName_OrigMito`` -> ``Mito``, ``FileName_OrigBrightfield`` ->
``Brightfield``), so JUMP manifests match models and flags that say ``DNA``. ``FileName_Illum<Channel>`` columns
hold JUMP's illumination-correction functions (``.npy``), not images, and are not channels. A ``channel_map``
(``--channel-map OrigDNA=Hoechst``) renames channels explicitly, keyed by the column's name after ``FileName_``;
it takes precedence over the rule.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from bio.io_base import ChannelSource, ChannelStack, Image, channel_indices
from bio.io_tiff import read_tiff
from core.errors import DinoscopeError

METADATA_COLUMNS = ("Metadata_Plate", "Metadata_Well", "Metadata_Site")
RAW_PREFIX, ILLUM_PREFIX = "Orig", "Illum"


def manifest_channel_names(columns: Sequence[str], channel_map: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{channel name: FileName_ column suffix}`` of a LoadData header, by the rule of the module docstring."""
    channel_map = channel_map or {}
    names: dict[str, str] = {}
    for column in columns:
        if not column.startswith("FileName_"):
            continue
        raw = column.removeprefix("FileName_")
        if raw in channel_map:
            name = channel_map[raw]
        elif raw.startswith(ILLUM_PREFIX) and len(raw) > len(ILLUM_PREFIX):
            continue
        elif raw.startswith(RAW_PREFIX) and len(raw) > len(RAW_PREFIX):
            name = raw[len(RAW_PREFIX) :]
        else:
            name = raw
        if name in names:
            raise DinoscopeError(
                f"columns FileName_{names[name]} and FileName_{raw} both name channel {name!r}",
                field=f"FileName_{raw}",
                fix="give them distinct names with --channel-map (e.g. --channel-map OrigDNA=DNA_raw)",
            )
        names[name] = raw
    return names


@dataclass(frozen=True)
class ManifestField:
    """One site of a manifest: its coordinates, one file per channel, and its line in the CSV (header = line 1).

    ``channel_columns`` maps each channel name to its column (``DNA`` -> ``OrigDNA`` for ``FileName_OrigDNA``).
    """

    plate: str
    well: str
    site: str
    channel_paths: dict[str, Path]
    line: int
    channel_columns: dict[str, str] = field(default_factory=dict)

    @property
    def channel_names(self) -> list[str]:
        """Channel names in the manifest's ``FileName_<channel>`` column order."""
        return list(self.channel_paths)


def read_manifest(
    csv_path: str | os.PathLike, *, check_files: bool = True, channel_map: Mapping[str, str] | None = None
) -> list[ManifestField]:
    """Parse a LoadData CSV; with ``check_files`` a missing image raises a DinoscopeError naming its CSV line.

    Channels are named by the rule of the module docstring, or by ``channel_map`` (``{"OrigDNA": "Hoechst"}``).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DinoscopeError("manifest not found", path=csv_path, fix="check the path to the LoadData CSV")
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in METADATA_COLUMNS if c not in header]
        try:
            channels = manifest_channel_names(header, channel_map)
        except DinoscopeError as err:
            raise DinoscopeError(err.message, path=csv_path, field=err.field, fix=err.fix) from None
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
    channel_map: Mapping[str, str] | None = None,
) -> Iterator[tuple[str, str, str, Image]]:
    """Yield ``(plate, well, site, image)`` per manifest row; only the requested channels' files are opened."""
    for site in read_manifest(csv_path, channel_map=channel_map):
        names = site.channel_names
        wanted = names if channels is None else [names[i] for i in channel_indices(names, channels, csv_path)]
        sources = []
        for name in wanted:
            plane = read_tiff(site.channel_paths[name], channel_names=None)
            if len(plane.channel_names) != 1:
                raise DinoscopeError(
                    f"expected one channel per file, found {len(plane.channel_names)}",
                    path=site.channel_paths[name],
                    field=f"FileName_{site.channel_columns.get(name, name)}",
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
    channels: dict[str, str],
    csv_path: Path,
    check_files: bool,
) -> ManifestField:
    paths: dict[str, Path] = {}
    for name, column in channels.items():
        file_name = (row.get(f"FileName_{column}") or "").strip()
        if not file_name:
            raise DinoscopeError(
                f"line {line}: empty FileName_{column}",
                path=csv_path,
                field=f"FileName_{column}",
                fix="give every channel a file name on every row",
            )
        folder = Path((row.get(f"PathName_{column}") or "").strip())
        path = Path(file_name) if Path(file_name).is_absolute() else folder / file_name
        if not path.is_absolute():
            path = csv_path.parent / path
        if check_files and not path.is_file():
            raise DinoscopeError(
                f"line {line}: image file {path} does not exist",
                path=csv_path,
                field=f"FileName_{column}",
                fix="fix PathName_/FileName_ on that line, or copy the image there",
            )
        paths[name] = path
    return ManifestField(
        plate=row["Metadata_Plate"],
        well=row["Metadata_Well"],
        site=row["Metadata_Site"],
        channel_paths=paths,
        line=line,
        channel_columns=dict(channels),
    )
