"""Plate maps: reading the ``plate, well, treatment, role`` CSV and joining it onto well profiles."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from bio.profiles import meta_column, metadata_columns, normalise_well_names
from core.errors import DinoscopeError

log = logging.getLogger(__name__)

PLATEMAP_REQUIRED = ("well", "treatment", "role")


def read_platemap(path: str | os.PathLike) -> pd.DataFrame:
    """Read a plate-map CSV (``plate, well, treatment, role`` plus any annotation such as ``moa``).

    ``plate`` may be omitted when one layout applies to every plate. All values are read as text.
    """
    path = Path(path)
    try:
        platemap = pd.read_csv(path, dtype=str, skipinitialspace=True)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise DinoscopeError(
            f"cannot read the plate map ({err})", path=path, fix="pass a CSV with columns plate, well, treatment, role"
        ) from err
    platemap.columns = [str(c).strip() for c in platemap.columns]
    missing = [c for c in PLATEMAP_REQUIRED if c not in platemap.columns]
    if missing:
        raise DinoscopeError(
            f"plate map lacks column(s) {missing}; it has {list(platemap.columns)}",
            path=path,
            field=missing[0],
            fix="add the columns plate, well, treatment, role",
        )
    platemap["well"] = normalise_well_names(platemap["well"])
    keys = [c for c in ("plate", "well") if c in platemap.columns]
    dup = platemap.duplicated(keys, keep=False)
    if dup.any():
        first = platemap.loc[dup, keys].iloc[0].to_dict()
        raise DinoscopeError(
            f"plate map lists {dup.sum()} rows for repeated wells, e.g. {first}",
            path=path,
            field="well",
            fix="give each (plate, well) exactly one row",
        )
    return platemap


def annotate_wells(wells: pd.DataFrame, platemap: pd.DataFrame) -> pd.DataFrame:
    """Join the plate map onto well profiles by (plate, well), or by well alone when the map has no plate."""
    renamed = platemap.rename(columns={c: meta_column(c) for c in platemap.columns})
    renamed["Metadata_well"] = normalise_well_names(renamed["Metadata_well"])
    on = [c for c in ("Metadata_plate", "Metadata_well") if c in renamed.columns]
    merged = wells.merge(renamed, on=on, how="left", indicator=True, validate="many_to_one")
    unmatched = merged["_merge"] == "left_only"
    if unmatched.all():
        example = wells[on].iloc[0].to_dict()
        raise DinoscopeError(
            f"no well of the run is in the plate map (e.g. {example})",
            field="plate/well",
            fix="check the plate names and well ids in the plate map",
        )
    if unmatched.any():
        log.warning("dropping %d wells absent from the plate map", int(unmatched.sum()))
    merged = merged.loc[~unmatched].drop(columns="_merge").reset_index(drop=True)
    meta = metadata_columns(merged)
    return merged[meta + [c for c in merged.columns if c not in meta]]
