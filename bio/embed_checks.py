"""What ``dinoscope cells embed`` (:mod:`bio.embed`) checks before it embeds anything, and how it explains a run
that embedded no cell.

:func:`check_inputs` reads metadata only (no pixels) and writes nothing, so a bad input fails in seconds with the
output directory untouched, instead of after hours of embedding: every image file of every LoadData row exists,
every NGFF field the plates list and every TIFF file opens, the channels the run reads exist in every field (after
the channel map), and a nuclei table names the sources' plates. Fields are opened by two threads: each is a handful of
small metadata reads, whose latency a network file system makes worth overlapping, while more threads only contend for
the GIL (and with the readers, which :mod:`bio.embed` starts before the checks).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bio.fields import CentroidFinder, FieldInfo, open_field_image
from bio.io import channel_indices, read_manifest
from core.errors import DinoscopeError

_FIELD_THREADS = 2  # opening a field is mostly Python (zarr): more threads only take turns with the GIL
_FILE_THREADS = 8  # a stat releases the GIL: on a network file system, many at once pay off
_SHOWN = 5


def check_inputs(fields: Sequence[FieldInfo], finder: CentroidFinder, names: Sequence[str]) -> None:
    """Raise a :class:`DinoscopeError` for the first unusable input of the run (see the module docstring).

    Args:
        fields: every field of the run (:func:`bio.fields.list_fields`).
        finder: where the centroids come from; its detection channel, label image or nuclei table is checked too.
        names: the channels to embed.
    """
    needed = list(names)
    if finder.method == "detect" and finder.detect_channel not in needed:
        needed.append(finder.detect_channel)
    by_source: dict[Path, list[FieldInfo]] = {}
    for field in fields:
        by_source.setdefault(field.source, []).append(field)
    for source, its_fields in by_source.items():
        if its_fields[0].path is None:
            _check_manifest(source, needed, finder, dict(its_fields[0].channel_map))
        else:
            with ThreadPoolExecutor(max_workers=_FIELD_THREADS) as pool:
                problems = [p for p in pool.map(lambda f: _field_problem(f, needed, finder), its_fields) if p]
            if problems:
                first = problems[0]
                more = (
                    f" ({len(problems) - 1} more of its {len(its_fields)} fields fail too)" if len(problems) > 1 else ""
                )
                raise DinoscopeError(first.message + more, path=first.path, field=first.field, fix=first.fix)
    if finder.method == "table":
        _check_table_covers(by_source, finder)


def _check_manifest(source: Path, needed: Sequence[str], finder: CentroidFinder, channel_map: dict[str, str]) -> None:
    """The manifest lists every channel the run reads, and every image file of every row exists."""
    rows = read_manifest(source, check_files=False, channel_map=channel_map)
    labels = finder.method == "labels" and finder.label_channel not in needed
    wanted = [*needed, finder.label_channel] if labels else needed
    channel_indices(rows[0].channel_names, wanted, source)
    listed = [(row.line, row.channel_columns[name], path) for row in rows for name, path in row.channel_paths.items()]
    with ThreadPoolExecutor(max_workers=_FILE_THREADS) as pool:  # network file systems answer slowly, but in parallel
        found = list(pool.map(lambda item: item[2].is_file(), listed))
    missing = [item for item, exists in zip(listed, found, strict=True) if not exists]
    if missing:
        line, name, path = missing[0]
        more = f" ({len(missing) - 1} more listed files are missing too)" if len(missing) > 1 else ""
        raise DinoscopeError(
            f"line {line}: image file {path} does not exist{more}",
            path=source,
            field=f"FileName_{name}",
            fix="fix PathName_/FileName_ on that line, or copy the images there",
        )


def _field_problem(field: FieldInfo, needed: Sequence[str], finder: CentroidFinder) -> DinoscopeError | None:
    """Why an NGFF field cannot be embedded (it does not open, or lacks a channel or label image), or None."""
    try:
        with open_field_image(field) as image:
            channel_indices(image.channel_names, needed, field.path)
            label = str(finder.label_channel)
            if (
                finder.method == "labels"
                and label not in image.channel_names
                and not (field.path / "labels" / label).exists()
            ):
                raise DinoscopeError(
                    f"no label image {label!r}: not a channel ({', '.join(image.channel_names)}) and no NGFF "
                    "labels group",
                    path=field.path,
                    field="label_channel",
                    fix="add the masks as a channel, or under <field>/labels/<name>",
                )
    except DinoscopeError as err:
        return DinoscopeError(f"field {field.key}: {err.message}", path=err.path, field=err.field, fix=err.fix)
    except Exception as err:  # noqa: BLE001 - zarr and the codecs raise many types for unreadable metadata
        return DinoscopeError(
            f"field {field.key} cannot be opened ({type(err).__name__}: {err})",
            path=field.path,
            fix="the field's metadata is unreadable or incomplete; re-copy or re-write the plate",
        )
    return None


def _check_table_covers(by_source: dict[Path, list[FieldInfo]], finder: CentroidFinder) -> None:
    """The nuclei table names the sources' plates, and has rows for at least one field of every source."""
    columns, keys = finder.table_keys()
    table = finder.table_path
    plates = list(dict.fromkeys(f.plate for fields in by_source.values() for f in fields))
    if "plate" in columns:
        named = list(dict.fromkeys(key[columns.index("plate")] for key in keys))
        if not set(named) & set(plates):
            raise DinoscopeError(
                f"the nuclei table names plates {_listed(named)}; the sources are {_listed(plates)}",
                path=table,
                field="plate",
                fix="the table's plate column (plate or Metadata_Plate) must hold the sources' plate names: an "
                "OME-Zarr plate's name in its metadata, or Metadata_Plate of a LoadData CSV",
            )
    for source, fields in by_source.items():
        if any(finder.table_key(f) in keys for f in fields):
            continue
        its_plates = list(dict.fromkeys(f.plate for f in fields))
        example = ["/".join(finder.table_key(f)) for f in fields[:3]]
        raise DinoscopeError(
            f"the nuclei table has no rows for any of the {len(fields)} fields of {source} (plate "
            f"{_listed(its_plates)}); the source's fields are {_listed(example)}..., the table's rows name "
            f"{_listed(['/'.join(k) for k in keys[:3]])}... ({'/'.join(columns)})",
            path=table,
            field="/".join(columns),
            fix="make the table's plate, well and site values match the sources' (wells like A01, sites as "
            "the field names of the plate), or drop the source",
        )


def nothing_embedded(
    run: Path, commits: Sequence[dict[str, Any]], finder: CentroidFinder, crop_size: int, edge: str
) -> DinoscopeError:
    """The error (exit status 2) of a run whose fields are all committed but hold no cell, saying why."""
    found = sum(int(c.get("found", c["n"])) for c in commits)
    where = f"any of the {len(commits)} fields"
    fix = "check that the centroids belong to these images"
    if found and edge == "skip":
        why = f"all {found} cells were skipped by --edge skip (every {crop_size}-pixel crop crosses the field border)"
        fix = "use --edge pad (border crops are zero-padded and flagged) or a smaller --crop-size"
    elif found:
        why = f"none of the {found} nuclei found gave a crop"
    elif finder.method == "detect":
        why = f"detection found no nuclei in channel {finder.detect_channel!r} in {where}"
        fix = (
            "check that --detect-channel names the nuclear stain and that the images are not blank, or give the "
            "nuclei with --centroids table or --centroids labels"
        )
    elif finder.method == "labels":
        why = f"the label images {finder.label_channel!r} hold no object in {where}"
    else:
        why = f"the nuclei table has no rows for {where}"
    return DinoscopeError(f"no cell was embedded: {why}", path=run, field="centroids", fix=fix)


def _listed(values: Sequence[str]) -> str:
    shown = ", ".join(repr(str(v)) for v in values[:_SHOWN])
    return shown + (f" and {len(values) - _SHOWN} more" if len(values) > _SHOWN else "")
