"""Plate maps: reading a plate-map CSV in our spelling (``plate, well, treatment, role``) or JUMP's
(``Metadata_Plate, Metadata_Well, Metadata_pert_iname, Metadata_control_type``), and joining it onto well profiles.

Every column of the map becomes a ``Metadata_`` column (:func:`bio.profiles.meta_column`): the plate and well keys
get JUMP's spelling (``plate``, ``Metadata_plate`` -> ``Metadata_Plate``), every other column keeps its name behind
the prefix. Which columns name treatments and controls is told by the column flags (``--treatment-column
Metadata_pert_iname --control-column Metadata_control_type --control-value negcon``), given with or without the
prefix.

A well of the run that the map does not list, and a well the map lists on one of the run's plates that has no cell
in the run, are errors naming them, unless ``allow_missing_wells`` (then they are dropped, with a warning), so a
typo in a plate name or a failed well never vanishes from a screen silently.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bio.profiles import META_PREFIX, meta_column, metadata_columns, normalise_well_names
from core.errors import DinoscopeError

log = logging.getLogger(__name__)

PLATE, WELL = meta_column("plate"), meta_column("well")
_SHOWN = 5


def read_platemap(path: str | os.PathLike, required: Sequence[str] = ("treatment", "role")) -> pd.DataFrame:
    """Read a plate-map CSV into ``Metadata_`` columns (see the module docstring); all values are text.

    Args:
        path: the CSV. It needs a well column (``well`` or ``Metadata_Well``, any case); a plate column is optional
            when one layout applies to every plate.
        required: the columns the caller uses (the ``--treatment-column``, ``--control-column`` or ``--label``
            values), each found with or without the ``Metadata_`` prefix.
    """
    path = Path(path)
    try:
        platemap = pd.read_csv(path, dtype=str, skipinitialspace=True)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise DinoscopeError(
            f"cannot read the plate map ({err})", path=path, fix="pass a CSV with columns plate, well, treatment, role"
        ) from err
    original = [str(c).strip() for c in platemap.columns]
    renamed = [meta_column(c) for c in original]
    seen: dict[str, str] = {}
    for before, after in zip(original, renamed, strict=True):
        if after in seen:
            raise DinoscopeError(
                f"plate map columns {seen[after]!r} and {before!r} both mean {after}",
                path=path,
                field=before,
                fix="keep one of them",
            )
        seen[after] = before
    platemap.columns = renamed
    missing = [name for name in ("well", *required) if meta_column(name) not in platemap.columns]
    if missing:
        near = [c for c in original if meta_column(c).lower() == meta_column(missing[0]).lower()]
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise DinoscopeError(
            f"plate map lacks column(s) {missing}{hint}; it has {', '.join(original)}",
            path=path,
            field=missing[0],
            fix="name the plate map's columns with the column flags (--treatment-column, --control-column, --label; "
            "JUMP's names work as they are, e.g. --treatment-column Metadata_pert_iname --control-column "
            "Metadata_control_type --control-value negcon), or add the columns",
        )
    platemap[WELL] = normalise_well_names(platemap[WELL])
    keys = [c for c in (PLATE, WELL) if c in platemap.columns]
    dup = platemap.duplicated(keys, keep=False)
    if dup.any():
        first = {seen[k]: v for k, v in platemap.loc[dup, keys].iloc[0].items()}
        raise DinoscopeError(
            f"plate map lists {dup.sum()} rows for repeated wells, e.g. {first}",
            path=path,
            field=seen[WELL],
            fix="give each (plate, well) exactly one row",
        )
    return platemap


def annotate_wells(
    wells: pd.DataFrame, platemap: pd.DataFrame, *, allow_missing_wells: bool = False
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Join the plate map onto well profiles by (plate, well), or by well alone when the map has no plate.

    Returns the annotated profiles and what did not match: ``{"not_in_platemap": [...], "without_cells": [...]}``
    as ``plate/well`` names. Either kind is a :class:`DinoscopeError` unless ``allow_missing_wells``.
    """
    mapped = platemap.rename(columns={c: meta_column(c) for c in platemap.columns})
    mapped[WELL] = normalise_well_names(mapped[WELL])
    on = [c for c in (PLATE, WELL) if c in mapped.columns]
    merged = wells.merge(mapped, on=on, how="left", indicator=True, validate="many_to_one")
    unmatched = (merged["_merge"] == "left_only").to_numpy()
    if unmatched.all():
        example = {k.removeprefix(META_PREFIX): v for k, v in wells[on].iloc[0].items()}
        raise DinoscopeError(
            f"no well of the run is in the plate map (e.g. {example}); the map names "
            + (f"plates {_listed(mapped[PLATE].unique())}" if PLATE in on else f"wells {_listed(mapped[WELL])}"),
            field="plate/well",
            fix="check the plate names and well ids in the plate map",
        )
    missing = {
        "not_in_platemap": _names(wells.loc[unmatched]),
        "without_cells": _names(_unused_wells(wells, mapped, on)),
    }
    problems = []
    if missing["not_in_platemap"]:
        problems.append(f"{len(missing['not_in_platemap'])} well(s) of the run are not in the plate map")
    if missing["without_cells"]:
        problems.append(f"{len(missing['without_cells'])} plate-map well(s) have no cell in the run")
    if problems and not allow_missing_wells:
        examples = "; ".join(f"{what.replace('_', ' ')}: {_listed(names)}" for what, names in missing.items() if names)
        raise DinoscopeError(
            f"{' and '.join(problems)} ({examples})",
            field="plate/well",
            fix="complete the plate map (or check its plate names), or pass --allow-missing-wells to drop these wells",
        )
    for problem in problems:
        log.warning("%s: dropped (--allow-missing-wells)", problem)
    merged = merged.loc[~unmatched].drop(columns="_merge").reset_index(drop=True)
    meta = metadata_columns(merged)
    return merged[meta + [c for c in merged.columns if c not in meta]], missing


def _unused_wells(wells: pd.DataFrame, mapped: pd.DataFrame, on: list[str]) -> pd.DataFrame:
    """Plate-map wells on the run's plates (all plates for a map without plates) with no profile in the run."""
    plates = wells[PLATE].astype(str).unique()
    if PLATE in on:
        listed = mapped.loc[mapped[PLATE].astype(str).isin(plates), [PLATE, WELL]]
    else:
        listed = pd.DataFrame([(p, w) for p in plates for w in mapped[WELL]], columns=[PLATE, WELL], dtype=object)
    have = set(zip(wells[PLATE].astype(str), wells[WELL].astype(str), strict=True))
    keep = [(p, w) not in have for p, w in zip(listed[PLATE].astype(str), listed[WELL].astype(str), strict=True)]
    return listed.loc[keep]


def _names(frame: pd.DataFrame) -> list[str]:
    columns = [c for c in (PLATE, WELL) if c in frame.columns]
    return ["/".join(str(v) for v in row) for row in frame[columns].itertuples(index=False)]


def _listed(values: Any) -> str:
    values = list(dict.fromkeys(str(v) for v in values))
    shown = ", ".join(values[:_SHOWN])
    return shown + (f" and {len(values) - _SHOWN} more" if len(values) > _SHOWN else "")
