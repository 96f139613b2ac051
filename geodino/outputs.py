"""What the canopy commands promise about their outputs: output paths that can be written, and a record in every
prediction COG of how it was made, so a rerun can tell "already done" from "made by something else".

The record (tag :data:`RECORD_TAG`, JSON) names the model and the input by content (size and SHA-256 of the first and
last bytes, so a copied or renamed file still matches) and every setting that changes the pixels: bands, tile,
overlap, margin, output encoding, uncertainty and attention heads. Settings that only change speed (batch size,
device, workers) are left out. :func:`output_state` compares an existing output's record with the one a run would
write:

* ``missing``: nothing there yet (or only some of the files, all made the same way): predict;
* ``complete``: every file exists and was made the same way: skip with a message;
* ``different``: a file exists that was made another way (or by another tool): refuse unless ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import rasterio
from rasterio.errors import RasterioError

from core.errors import DinoscopeError

RECORD_TAG = "DINOSCOPE_PREDICTION"
RECORD_VERSION = 1
MODEL_CHUNK = 1 << 20  # safetensors keep their header (with the fit's metadata) first, the last tensors at the end
_INPUT_CHUNK = 64 << 10  # a GeoTIFF's header and first/last blocks: cheap even for thousands of tiles


def check_output_path(path: str | os.PathLike, *, is_dir: bool, field: str = "out", suffix: str = ".tif") -> Path:
    """Refuse an output that cannot be written as asked: a file path that is an existing directory, a directory
    path that is an existing file, or a path below a file. Writes nothing."""
    path = Path(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DinoscopeError(
                    f"cannot write here: {parent} is a file, not a directory",
                    path=path,
                    field=field,
                    fix="choose an output whose parent folders are directories",
                )
            break
    if is_dir and path.exists() and not path.is_dir():
        raise DinoscopeError(
            "is an existing file, but a directory is needed here",
            path=path,
            field=field,
            fix="give a directory (it is created when missing), or remove the file",
        )
    if not is_dir and path.is_dir():
        raise DinoscopeError(
            "is an existing directory, but a file is needed here",
            path=path,
            field=field,
            fix=f"give a file name inside it, e.g. {path / ('output' + suffix)}",
        )
    return path


def content_id(path: str | os.PathLike, chunk: int = _INPUT_CHUNK) -> dict[str, Any]:
    """``{"name", "bytes", "sha256"}`` of a file, the hash over its first and last ``chunk`` bytes (whole when
    small); a directory (e.g. a zarr model) is named by its name only."""
    path = Path(path)
    if not path.is_file():
        return {"name": path.name, "bytes": None, "sha256": None}
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            digest.update(f.read(chunk))
    return {"name": path.name, "bytes": size, "sha256": digest.hexdigest()}


def prediction_record(model: dict[str, Any], source: str | os.PathLike, settings: dict[str, Any]) -> dict[str, Any]:
    """The record of one prediction: model and input identities plus the settings that change the pixels."""
    return {"version": RECORD_VERSION, "model": model, "input": content_id(source), **settings}


def read_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record stored in a prediction COG; None when the file has none or is not a readable raster."""
    try:
        with rasterio.open(path) as ds:
            text = ds.tags().get(RECORD_TAG)
    except RasterioError:
        return None
    try:
        record = json.loads(text) if text else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def record_differences(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """How ``old`` differs from ``new``, one phrase each (empty when they match)."""
    if old is None:
        return ["it has no record of how it was made (another tool or an older version wrote it)"]
    changes = []
    for key in ("model", "input"):
        before, after = old.get(key) or {}, new[key]
        if (before.get("bytes"), before.get("sha256")) != (after["bytes"], after["sha256"]):
            what = "another model" if key == "model" else "a different input file"
            if before.get("name") == after["name"]:
                changes.append(f"the {key} file {after['name']} has changed since it was made")
            else:
                changes.append(f"it was made from {what} ({before.get('name')}, now {after['name']})")
    for key in sorted((set(old) | set(new)) - {"model", "input"}):
        if old.get(key) != new.get(key):
            changes.append(f"{key} was {old.get(key)!r}, now {new.get(key)!r}")
    return changes


def output_state(paths: Sequence[Path], record: dict[str, Any]) -> tuple[str, list[str]]:
    """``("missing" | "complete" | "different", differences)`` for the files one prediction writes."""
    existing = [p for p in paths if p.exists()]
    if not existing:
        return "missing", []
    differences = []
    for path in existing:
        differences += [f"{path.name}: {d}" for d in record_differences(read_record(path), record)]
    if differences:
        return "different", differences
    return ("complete" if len(existing) == len(paths) else "missing"), []


def refuse_different(conflicts: list[tuple[Path, list[str]]], field: str = "out") -> None:
    """Raise the one error for outputs that exist but were made another way (``--overwrite`` replaces them)."""
    first, differences = conflicts[0]
    more = f" (and {len(conflicts) - 1} more output(s))" if len(conflicts) > 1 else ""
    raise DinoscopeError(
        f"exists and was made differently: {'; '.join(differences[:4])}{more}",
        path=first,
        field=field,
        fix="pass --overwrite to replace it, or choose another --out",
    )
