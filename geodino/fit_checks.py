"""Checks ``dinoscope canopy fit`` makes before it writes anything: the (image, CHM) pairs, and a finished fit
already in the run directory.

:func:`check_fit_pairs` opens every listed pair (not the synthetic forests, which the fit writes itself) so a
missing file, an unknown band or a reference with several bands fails before ``config.yaml`` exists.
:func:`check_previous_fit` refuses to replace a finished fit made with another recipe unless asked: a run directory
holds one model, and silently replacing it would leave earlier predictions pointing at a model that no longer exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from core.config.loader import to_yaml
from core.errors import DinoscopeError
from geodino.config import CanopyFitRecipe
from geodino.raster import RasterSource

# Recipe keys that change where or how fast a fit runs, never the model it produces.
OPERATIONAL_KEYS = ("train.output_dir", "train.progress", "train.num_workers", "train.device")
FINISHED_FILES = ("model.safetensors", "metrics.json")


def check_fit_pairs(recipe: CanopyFitRecipe, bands: list[int | str] | None, in_chans: int) -> None:
    """Every listed image opens with the selected bands, which match the backbone's channels, and every CHM opens
    and has one band. Reads headers only; writes nothing."""
    for i, (image, chm) in enumerate(recipe.data.pairs):
        with RasterSource(Path(image), bands=bands) as src:
            if src.count != in_chans:
                raise DinoscopeError(
                    f"the backbone takes {in_chans} channels but {src.count} bands are selected ({src.band_names})",
                    path=image,
                    field="data.bands",
                    fix="select matching bands, or adapt the backbone with backbone.overrides.in_chans=N",
                )
        with RasterSource(Path(chm)) as ref:
            if ref.count != 1:
                raise DinoscopeError(
                    f"the reference of data.pairs[{i}] has {ref.count} bands; a CHM has one",
                    path=chm,
                    field="data.pairs",
                    fix="give the single-band canopy height model (e.g. a lidar CHM) as the second file of each pair",
                )


def check_previous_fit(run_dir: Path, recipe: CanopyFitRecipe, overwrite: bool) -> None:
    """Refuse a run directory holding a finished fit of another recipe, unless ``overwrite``.

    The same recipe fits again (a head fit never resumes; the feature cache makes it quick).
    """
    if overwrite or not all((run_dir / name).exists() for name in FINISHED_FILES):
        return
    config = run_dir / "config.yaml"
    try:
        old = yaml.safe_load(config.read_text()) if config.exists() else None
    except (OSError, yaml.YAMLError):
        old = None
    if not isinstance(old, dict):
        changes = ["its recipe is unknown (no readable config.yaml)"]
    else:
        changes = [c for c in _differences(old, yaml.safe_load(to_yaml(recipe))) if c[0] not in OPERATIONAL_KEYS]
        changes = [f"{key}: {before!r} -> {after!r}" for key, before, after in changes]
    if changes:
        more = f" and {len(changes) - 5} more" if len(changes) > 5 else ""
        raise DinoscopeError(
            f"already holds a finished fit made with a different recipe ({'; '.join(changes[:5])}{more})",
            path=run_dir,
            field="output_dir",
            fix="choose another --output-dir (or train.output_dir), or replace that fit with "
            "`dinoscope canopy fit ... --overwrite`",
        )


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every leaf that differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in [*old, *(k for k in new if k not in old)]:
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]
