"""Fields stored as one multi-channel (OME-)TIFF file each: single files, folders of them, and image lists.

``dinoscope cells embed`` takes, besides OME-Zarr plates and LoadData manifests:

* a ``.tif``/``.tiff`` file (OME-TIFF or plain TIFF), one field with every channel;
* a folder of such files (not searched recursively), one field per file, in file-name order;
* an image list: a CSV with a ``file`` column (one multi-channel TIFF per row; relative paths are relative to the
  CSV's folder) and ``well``, optionally ``plate`` and ``site`` columns (or JUMP's ``Metadata_Well`` ...).

Plate, well and site (field) of a file come from its name (the part before ``.ome.tif``/``.tif``), matched in full
by a regular expression with the named groups ``plate``, ``well`` and ``site`` (or ``row`` and ``column`` in place
of ``well``; a numeric row 1, 2, ... is row A, B, ...). The default, :data:`DEFAULT_NAME_PATTERN`, reads names like
``BR00117010_A01_s1``, ``plate1-B12-2`` or ``plate1_C03_field4``; Opera Phenix names ``r03c04f05`` need
``--name-pattern 'r(?P<row>\\d+)c(?P<column>\\d+)f(?P<site>\\d+)'``. Without a ``plate`` group the plate is the
folder's name; without a ``site`` group the site is ``0``. Sites are numbers written without leading zeros and wells
as ``A01``, so names and tables match whatever the padding. A name the pattern does not match is an error naming it,
before anything is embedded.

Channels are read from the files' OME-XML and matched by name, so files with channels in different orders are
embedded alike.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from bio.config import DEFAULT_NAME_PATTERN
from bio.io import well_name
from bio.profiles import normalise_well_names
from core.errors import DinoscopeError

TIFF_SUFFIXES = (".tif", ".tiff")
_FILE_COLUMNS = ("file", "path", "filename", "image")
_SHOWN = 3


def is_tiff(path: Path) -> bool:
    """Whether ``path`` names a TIFF file by its suffix."""
    return path.suffix.lower() in TIFF_SUFFIXES


def is_tiff_folder(path: Path) -> bool:
    """Whether ``path`` is a folder that is not a zarr group (so: a folder of TIFF files)."""
    markers = ("zarr.json", ".zgroup", ".zattrs")
    return path.is_dir() and path.suffix.lower() != ".zarr" and not any((path / m).exists() for m in markers)


def is_image_list(path: Path) -> bool:
    """Whether a CSV is an image list (a ``file`` column) rather than a LoadData manifest (``FileName_`` columns)."""
    try:
        header = [str(c).strip().lower() for c in pd.read_csv(path, nrows=0).columns]
    except (OSError, ValueError):
        return False
    return not any(c.startswith("filename_") for c in header) and any(c in _FILE_COLUMNS for c in header)


def stem(path: Path) -> str:
    """The file name without its TIFF suffixes (``a.ome.tif`` -> ``a``)."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def tiff_fields(source: Path, name_pattern: str = DEFAULT_NAME_PATTERN) -> list[tuple[str, str, str, Path]]:
    """``(plate, well, site, file)`` of a TIFF file or of every TIFF in a folder, named by ``name_pattern``."""
    try:
        pattern = re.compile(name_pattern)
    except re.error as err:
        raise DinoscopeError(
            f"the name pattern is not a regular expression ({err})", field="name_pattern", fix="fix --name-pattern"
        ) from None
    if not ({"well"} <= set(pattern.groupindex) or {"row", "column"} <= set(pattern.groupindex)):
        raise DinoscopeError(
            f"the name pattern {name_pattern!r} has no group 'well' (or 'row' and 'column')",
            field="name_pattern",
            fix="name the groups, e.g. (?P<plate>.+)_(?P<well>[A-P]\\d+)_(?P<site>\\d+)",
        )
    files = sorted(p for p in source.iterdir() if p.is_file() and is_tiff(p)) if source.is_dir() else [source]
    if not files:
        raise DinoscopeError(
            "the folder holds no .tif or .tiff file",
            path=source,
            field="sources",
            fix="pass a folder of multi-channel (OME-)TIFF files, or the files themselves",
        )
    out, unmatched = [], []
    for file in files:
        match = pattern.fullmatch(stem(file))
        if match is None:
            unmatched.append(file.name)
            continue
        groups = {k: v for k, v in match.groupdict().items() if v is not None}
        well = groups.get("well") or well_name(_row_letter(groups["row"]), groups["column"])
        plate = groups.get("plate") or file.parent.name
        out.append((plate, _well(well), _site(groups.get("site", "0")), file))
    if unmatched:
        shown = ", ".join(unmatched[:_SHOWN]) + (f" and {len(unmatched) - _SHOWN} more" if len(unmatched) > 3 else "")
        raise DinoscopeError(
            f"{len(unmatched)} file name(s) do not match the name pattern {name_pattern!r}: {shown}",
            path=source,
            field="name_pattern",
            fix="rename the files (e.g. PLATE_A01_s1.ome.tif), give --name-pattern with groups plate, well and site, "
            "or list the files with their plate, well and site in a CSV (columns file, plate, well, site)",
        )
    return out


def image_list_fields(csv_path: Path) -> list[tuple[str, str, str, Path]]:
    """``(plate, well, site, file)`` of every row of an image list (see the module docstring)."""
    try:
        table = pd.read_csv(csv_path, dtype=str, skipinitialspace=True)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise DinoscopeError(f"cannot read the image list ({err})", path=csv_path) from None
    lower = {str(c).strip().lower(): c for c in table.columns}
    column = {key: lower.get(f"metadata_{key}", lower.get(key)) for key in ("plate", "well", "site")}
    column["file"] = next(lower[c] for c in _FILE_COLUMNS if c in lower)
    if column["well"] is None:
        raise DinoscopeError(
            "the image list has no well column",
            path=csv_path,
            field="well",
            fix="give the columns file, plate, well, site (or Metadata_Well ...)",
        )
    out = []
    for line, row in enumerate(table.itertuples(index=False), start=2):
        values = dict(zip(table.columns, row, strict=True))
        name = str(values[column["file"]] or "").strip()
        well = str(values[column["well"]] or "").strip()
        if not name or not well or name == "nan" or well == "nan":
            raise DinoscopeError(
                f"line {line}: empty file or well", path=csv_path, fix="give every row a file and a well"
            )
        file = Path(name) if Path(name).is_absolute() else csv_path.parent / name
        plate = str(values[column["plate"]]).strip() if column["plate"] else file.parent.name
        site = str(values[column["site"]]).strip() if column["site"] else "0"
        out.append((plate, _well(well), _site(site), file))
    if not out:
        raise DinoscopeError("the image list lists no file", path=csv_path, field="sources")
    return out


def _row_letter(row: str) -> str:
    return chr(ord("A") + int(row) - 1) if row.isdigit() else row.upper()


def _well(well: str) -> str:
    return str(normalise_well_names(pd.Series([well])).iloc[0])


def _site(site: str) -> str:
    return str(int(site)) if site.isdigit() else site
