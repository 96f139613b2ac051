"""An existing output is never replaced or skipped silently.

A command whose schema marks its outputs (``option(..., output="file" | "dir")``) gets ``--overwrite``, and after a
successful run a small record of how the output was made: the command, the resolved recipe and a fingerprint
(size, modification time) of every input file. The next run on the same output then

* finds the same command, settings and inputs: says the output is up to date and does nothing (exit 0);
* finds anything else, or an output this command did not write: refuses (exit 2) naming what differs, unless
  ``--overwrite`` is given.

Long runs with their own resume logic (pretrain, canopy predict and fit, cells embed) keep theirs and mark no
outputs here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from core.config.fields import INPUT_PATH, OUTPUT_PATH, walk_fields
from core.errors import DinoscopeError
from core.io import write_json

log = logging.getLogger(__name__)
RECORD_VERSION = 1
DIR_RECORD = ".dinoscope-output.json"


def record_path(output: Path, kind: str) -> Path:
    """Where the record of ``output`` lives: inside a directory output, beside a file output (hidden)."""
    return output / DIR_RECORD if kind == "dir" else output.with_name(f".{output.name}.dinoscope.json")


def _flatten(value: Any) -> list[str]:
    """Paths in a value that is a path, a list of them or a list of lists (``data.pairs``)."""
    if isinstance(value, (list, tuple)):
        return [p for item in value for p in _flatten(item)]
    return [str(value)] if value else []


def _fingerprint(path: Path) -> list[Any]:
    if path.is_file():
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]
    if path.is_dir():  # a run directory: its direct entries (names, sizes, times) stand for its content
        entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in entries]
    return []


@dataclass
class OutputGuard:
    """The outputs of one command run and how they were made (see the module docstring)."""

    command: str
    recipe: Any
    overwrite: bool

    def __post_init__(self) -> None:
        self.outputs: list[tuple[str, Path, str]] = [
            (ref.key, Path(ref.value), ref.metadata[OUTPUT_PATH])
            for ref in walk_fields(self.recipe)
            if ref.metadata.get(OUTPUT_PATH) and ref.value
        ]
        self.made: dict[str, Any] = {}
        if not self.outputs:
            return
        inputs = {
            ref.key: [[v, _fingerprint(Path(v))] for v in _flatten(ref.value)]
            for ref in walk_fields(self.recipe)
            if ref.metadata.get(INPUT_PATH) and ref.value
        }
        settings = OmegaConf.to_container(OmegaConf.structured(self.recipe), resolve=True)
        self.made = {"version": RECORD_VERSION, "command": self.command, "settings": settings, "inputs": inputs}

    def _existing(self, path: Path, kind: str) -> bool:
        # A path of the wrong kind (a directory where a file is written) is the service's error to explain.
        if kind == "dir":
            return path.is_dir() and any(path.iterdir())
        return path.is_file()

    def _differences(self, record: dict[str, Any]) -> list[str]:
        changed = [k for k in ("command", "settings") if record.get(k) != self.made[k]]
        if record.get("command") == self.made["command"] and record.get("settings") != self.made["settings"]:
            before, now = record.get("settings") or {}, self.made["settings"]
            changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in now if before.get(k) != now.get(k)]
        if record.get("inputs") != self.made["inputs"]:
            changed.append("an input file changed since")
        return changed

    def up_to_date(self) -> bool:
        """Check every existing output: ``True`` when all were made exactly this way (nothing to do); raises a
        :class:`DinoscopeError` for an output made otherwise, unless ``overwrite``."""
        if not self.outputs:
            return False
        state = []
        for key, path, kind in self.outputs:
            if not self._existing(path, kind):
                state.append(False)
                continue
            record_file = record_path(path, kind)
            try:
                record = json.loads(record_file.read_text())
            except (OSError, ValueError):
                record = None
            if record is not None and not self._differences(record):
                state.append(True)
                continue
            if self.overwrite:
                state.append(False)
                continue
            why = (
                "was not written by this command"
                if record is None
                else "was made differently (" + "; ".join(self._differences(record)[:5]) + ")"
            )
            raise DinoscopeError(
                f"the output exists and {why}",
                path=path,
                field=key,
                fix="pass --overwrite to replace it, or choose another output",
            )
        return all(state)

    def record(self) -> None:
        """After a successful run: write the record of every output."""
        for _, path, kind in self.outputs:
            if path.exists():
                write_json(record_path(path, kind), self.made)


def describe_up_to_date(guard: OutputGuard) -> str:
    """The message for a run with nothing to do."""
    names = ", ".join(str(path) for _, path, _ in guard.outputs)
    return f"{names}: up to date (same command, settings and inputs); nothing to do. --overwrite recomputes it"


def output_kinds(schema_instance: Any) -> list[str]:
    """The output kinds a recipe declares (used to decide whether a command gets ``--overwrite``)."""
    return [ref.metadata[OUTPUT_PATH] for ref in walk_fields(schema_instance) if OUTPUT_PATH in ref.metadata]


def has_outputs(schema: type) -> bool:
    """Whether a schema class declares any output field (walks its defaults)."""
    try:
        return bool(output_kinds(schema()))
    except TypeError:  # a schema without defaults for every field
        return False
