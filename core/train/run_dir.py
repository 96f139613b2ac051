"""Resume hygiene for a training run directory: recipe drift, logs written past the last checkpoint, orphans.

A resumed run must continue the trajectory it checkpointed. Three things break that silently:

* a recipe change (``optim.base_lr``) makes the resumed half a different experiment; :func:`check_recipe_on_resume`
  refuses it unless the user accepts it explicitly, and then records it in ``RUN/recipe_changes.jsonl``.
  Keys in :data:`OPERATIONAL_KEYS` (workers, logging, checkpoint cadence, ...) never alter the trajectory and pass.
* a crash after logging iterations beyond the last checkpoint would leave those iterations twice in the JSONL logs
  once the resumed run logs them again; :func:`truncate_jsonl` cuts the logs back to the checkpoint.
* a crash inside :func:`core.io.atomic_path` leaves ``.NAME.tmp-*`` files or directories; :func:`clean_orphans`
  removes them.

Every function here rewrites or deletes files in the run directory, so call them only while holding the run lock
(:func:`core.lock.exclusive_lock`) and on one rank: a concurrent writer could be mid-rename.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from core.errors import DinoscopeError
from core.io import atomic_path
from core.train.checkpoint import CHECKPOINTS_DIR, plain_config

log = logging.getLogger(__name__)

RECIPE_CHANGES_FILE = "recipe_changes.jsonl"
ALLOW_FLAG = "--allow-recipe-change"
RECIPE_CHANGE_FIX = (
    "resume with the original recipe, start a new run directory, or pass --allow-recipe-change to "
    "accept the change (it is recorded in RUN/recipe_changes.jsonl)"
)
MAX_LISTED_CHANGES = 20

# Recipe keys (dotted; fnmatch patterns; a pattern also covers everything below it) whose change leaves the training
# trajectory unchanged: how fast data is loaded, where and how often things are logged or saved, how DeepSpeed
# buckets communication, and the periodic evaluation (which reads the teacher but never updates it).
OPERATIONAL_KEYS: tuple[str, ...] = (
    "train.num_workers",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.output_dir",
    "train.device",
    "train.pin_memory",
    "train.persistent_workers",
    "train.prefetch_factor",
    "train.log_grad_norms",
    "dist.overlap_comm",
    "dist.contiguous_gradients",
    "dist.reduce_bucket_size",
    "dist.allgather_bucket_size",
    "dist.stage3_*",
    "dist.ema_gather_numel",
    "eval.*",
)


class _Absent:
    """Marks a key present on one side of a comparison only."""

    def __repr__(self) -> str:
        return "<absent>"


ABSENT: Any = _Absent()
ABSENT_JSON = "<absent>"  # how ABSENT is written to recipe_changes.jsonl


# ------------------------------------------------------------------------------------------------------ recipes
def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaves of nested mappings. Lists are leaves (compared as whole values); an empty mapping is a leaf
    too, so that ``params: {}`` versus a missing ``params`` still counts as a change."""
    if isinstance(tree, Mapping) and (tree or not prefix):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def _same(a: Any, b: Any) -> bool:
    # True == 1 in Python, but a flag turned into a number is a change worth reporting; 1 vs 1.0 is not.
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return a == b


def recipe_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two nested recipes, as ``(key, old, new)`` sorted by key.

    A key present on one side only is reported with :data:`ABSENT` on the other side.
    """
    flat_old, flat_new = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(flat_old.keys() | flat_new.keys()):
        a, b = flat_old.get(key, ABSENT), flat_new.get(key, ABSENT)
        if a is ABSENT or b is ABSENT or not _same(a, b):
            changes.append((key, a, b))
    return changes


def is_operational(key: str, patterns: Iterable[str] = OPERATIONAL_KEYS) -> bool:
    """Whether changing ``key`` leaves the training trajectory unchanged (it or one of its parents matches)."""
    parts = key.split(".")
    candidates = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(c, p) for c in candidates for p in patterns)


def _show(value: Any, limit: int = 80) -> str:
    text = ABSENT_JSON if value is ABSENT else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_changes(changes: list[tuple[str, Any, Any]], limit: int = MAX_LISTED_CHANGES) -> str:
    """``key: old -> new`` lines (the first ``limit``, then ``and N more``)."""
    lines = [f"{key}: {_show(a)} -> {_show(b)}" for key, a, b in changes[:limit]]
    if len(changes) > limit:
        lines.append(f"and {len(changes) - limit} more")
    return "\n".join(f"    {line}" for line in lines)


def _to_json(value: Any) -> Any:
    return ABSENT_JSON if value is ABSENT else value


def check_recipe_on_resume(
    run_dir: str | os.PathLike,
    saved_config: Any,
    new_config: Any,
    *,
    allow_change: bool,
    iteration: int,
    path_for_errors: str | os.PathLike | None = None,
    record: bool = True,
) -> list[tuple[str, Any, Any]]:
    """Refuse a resume whose recipe changes the training trajectory, unless ``allow_change``.

    Args:
        run_dir: the run directory being resumed.
        saved_config: the recipe stored in the checkpoint (``client_state["config"]``); None for old checkpoints
            without one, which are accepted with a warning.
        new_config: the recipe of this invocation (mapping, dataclass or OmegaConf; normalised by ``plain_config``).
        allow_change: the user passed ``--allow-recipe-change``.
        iteration: the iteration the run resumes at (recorded with an accepted change).
        path_for_errors: the path the error names; the run directory by default.
        record: write ``recipe_changes.jsonl``; pass ``get_rank() == 0`` so that only one rank appends, while every
            rank still checks (and refuses) identically.

    Returns:
        every change ``(key, old, new)``, operational ones included (those are logged at INFO, never refused).
    """
    run_dir = Path(run_dir)
    if saved_config is None:
        log.warning(
            "the checkpoint in %s stores no recipe (written by an older dinoscope); the resumed recipe "
            "cannot be checked against the original",
            run_dir,
        )
        return []
    changes = recipe_changes(plain_config(saved_config) or {}, plain_config(new_config) or {})
    operational = [c for c in changes if is_operational(c[0])]
    trajectory = [c for c in changes if not is_operational(c[0])]
    if operational:
        log.info("resuming %s with operational recipe changes (allowed):\n%s", run_dir, format_changes(operational))
    if not trajectory:
        return changes
    if not allow_change:
        raise DinoscopeError(
            f"the recipe differs from the one this run was trained with, in {len(trajectory)} "
            f"key(s) that change training (resuming at iteration {iteration}):\n"
            f"{format_changes(trajectory)}",
            path=path_for_errors or run_dir,
            field=trajectory[0][0],
            fix=RECIPE_CHANGE_FIX,
        )
    log.warning(
        "resuming %s at iteration %d with recipe changes accepted by %s:\n%s",
        run_dir,
        iteration,
        ALLOW_FLAG,
        format_changes(trajectory),
    )
    if record:
        line = {
            "iteration": int(iteration),
            "time": time.time(),
            "changes": [[k, _to_json(a), _to_json(b)] for k, a, b in trajectory],
            "operational": [[k, _to_json(a), _to_json(b)] for k, a, b in operational],
        }
        run_dir.mkdir(parents=True, exist_ok=True)
        # One short append; a crash can at worst tear this last line, which readers of JSONL skip.
        with (run_dir / RECIPE_CHANGES_FILE).open("a") as f:
            f.write(json.dumps(line, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return changes


# ------------------------------------------------------------------------------------------------------ logs
def truncate_jsonl(path: str | os.PathLike, *, after_iteration: int, key: str = "iteration") -> int:
    """Atomically drop the records of a JSONL log whose ``key`` exceeds ``after_iteration``; return how many lines
    were dropped (0 for a missing file, which is left missing).

    Records without the key, or with a non-numeric value, are kept, as are unparsable lines in the middle (not ours
    to judge; logged). An unparsable last line is a write torn by the crash and is dropped. Kept lines stay
    byte-identical; a complete last record without its newline gets one, so the next append starts a new line.
    The file is rewritten only when something changes, keeping its permission bits.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    data = path.read_bytes()
    terminated = data.endswith(b"\n") or not data
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # what follows the final newline: nothing
    kept: list[bytes] = []
    dropped = 0
    for index, line in enumerate(lines):
        last = index == len(lines) - 1
        if not line.strip():
            kept.append(line)
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if last:
                dropped += 1
            else:
                log.warning("%s line %d is not JSON; kept as is", path, index + 1)
                kept.append(line)
            continue
        value = record.get(key) if isinstance(record, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > after_iteration:
            dropped += 1
        else:
            kept.append(line)
    if dropped == 0 and terminated:
        return 0
    mode = stat.S_IMODE(path.stat().st_mode)
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"".join(line + b"\n" for line in kept))
        os.chmod(tmp, mode)  # atomic_path's temporary is 0600; a rewrite must not change who can read the log
    if dropped:
        log.info(
            "%s: dropped %d line(s) logged after iteration %d (or torn by a crash)", path, dropped, after_iteration
        )
    return dropped


# ------------------------------------------------------------------------------------------------------ orphans
# atomic_path names its temporaries ".<final name>.tmp-<random><suffix>".
_ORPHAN_RE = re.compile(r"\..+\.tmp-.+")


def clean_orphans(run_dir: str | os.PathLike, subdirs: Iterable[str] = (CHECKPOINTS_DIR,)) -> list[Path]:
    """Remove the temporaries a crashed :func:`core.io.atomic_path` left in ``run_dir`` and its ``subdirs``.

    Only call it while holding the run lock, on one rank, before the run writes anything: a live writer's
    temporary (a checkpoint being saved by every rank) looks exactly like an orphan. Returns the removed paths.
    """
    run_dir = Path(run_dir)
    removed = []
    for directory in (run_dir, *(run_dir / s for s in subdirs)):
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if not _ORPHAN_RE.fullmatch(path.name):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    if removed:
        log.info(
            "removed %d temporary file(s) left by an interrupted write: %s",
            len(removed),
            ", ".join(str(p.relative_to(run_dir)) for p in removed),
        )
    return removed
