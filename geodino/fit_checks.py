"""Checks ``dinoscope canopy fit`` makes before it writes anything: the (image, CHM) pairs, and a finished fit
already in the run directory.

:func:`check_fit_pairs` opens every listed pair (not the synthetic forests, which the fit writes itself) so a
missing file, an unknown band, a reference with several bands, an image no CHM covers or an image whose dtype does
not fit the normalisation fails before ``config.yaml`` exists.
:func:`check_previous_fit` refuses to replace a finished fit made with another recipe unless asked: a run directory
holds one model, and silently replacing it would leave earlier predictions pointing at a model that no longer exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import rasterio
import yaml
from rasterio.warp import transform_bounds

from core.config.loader import to_yaml
from core.errors import DinoscopeError
from geodino.config import CanopyFitRecipe
from geodino.fit_data import listed_pairs
from geodino.inputs import percentile_range, training_record
from geodino.raster import RasterSource
from geodino.values import InputRule, user_rule

# Recipe keys that change where or how fast a fit runs, never the model it produces.
OPERATIONAL_KEYS = ("train.output_dir", "train.progress", "train.num_workers", "train.device")
FINISHED_FILES = ("model.safetensors", "metrics.json")


def check_fit_pairs(recipe: CanopyFitRecipe, bands: list[int | str] | None, in_chans: int) -> None:
    """Every listed image (globs expanded) opens with the selected bands, which match the backbone's channels; every
    CHM opens, has one band and covers part of some image; an image no CHM covers is refused; and the images' dtype
    and values fit the normalisation (:func:`geodino.inputs.training_record`). Reads headers and a decimated sample
    only; writes nothing."""
    listed = listed_pairs(recipe)
    for chm in sorted({c for _, chms in listed for c in chms}):
        with RasterSource(chm) as ref:
            if ref.count != 1:
                raise DinoscopeError(
                    f"this reference has {ref.count} bands; a CHM has one",
                    path=chm,
                    field="data.chm" if recipe.data.images else "data.pairs",
                    fix="give the single-band canopy height model (e.g. a lidar CHM) as the second file of each pair",
                )
    for image, chms in listed:
        with RasterSource(image, bands=bands) as src:
            if src.count != in_chans:
                raise DinoscopeError(
                    f"the backbone takes {in_chans} channels but {src.count} bands are selected ({src.band_names})",
                    path=image,
                    field="data.bands",
                    fix="select matching bands, or adapt the backbone with backbone.overrides.in_chans=N",
                )
            if not any(_overlaps(src, chm) for chm in chms):
                raise DinoscopeError(
                    f"no CHM covers this image ({', '.join(c.name for c in chms[:3])}"
                    f"{' ...' if len(chms) > 3 else ''} lie elsewhere)",
                    path=image,
                    field="data.chm" if recipe.data.images else "data.pairs",
                    fix="give a CHM (or a VRT / glob of CHM tiles) covering the images, or leave this image out",
                )
    if listed:
        images = [image for image, _ in listed]
        rule = fit_input_rule(recipe, images, bands)
        sources = [RasterSource(image, bands=bands, convert=rule) for image in images]
        try:
            training_record(sources, normalise=recipe.data.normalise, dtype_max=recipe.data.dtype_max, rule=rule)
        finally:
            for source in sources:
                source.close()


def fit_input_rule(recipe: CanopyFitRecipe, images: Sequence[Path], bands: list[int | str] | None) -> InputRule | None:
    """The rule ``data.input_range`` / ``data.input_scale`` ask for (``auto``: percentiles of the images), mapping
    onto ``0..data.dtype_max``; stored with the model and applied again at prediction."""
    target = (0.0, float(recipe.data.dtype_max))

    def auto() -> tuple[list, list]:
        sources = [RasterSource(image, bands=bands) for image in images]
        try:
            return percentile_range(sources)
        finally:
            for source in sources:
                source.close()

    return user_rule(recipe.data.input_range, recipe.data.input_scale, target, auto)


def _overlaps(image: RasterSource, chm: Path) -> bool:
    with rasterio.open(chm) as ds:
        if ds.crs is None or image.crs is None:
            return True  # AlignedTarget explains a missing CRS
        left, bottom, right, top = transform_bounds(ds.crs, image.crs, *ds.bounds)
    box = image.bounds
    return left < box.right and right > box.left and bottom < box.top and top > box.bottom


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
