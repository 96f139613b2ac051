"""Normalisation of well profiles against negative controls and treatment consensus profiles (pycytominer;
Way et al., JOSS 2022)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from pycytominer import consensus, normalize

from bio.profiles import feature_columns, meta_column, metadata_columns
from core.errors import DinoscopeError

NORMALISATIONS = ("mad_robustize", "standardize", "spherize", "none")


def normalise_profiles(
    profiles: pd.DataFrame,
    *,
    method: str = "mad_robustize",
    control_column: str = "role",
    control_value: str = "negative_control",
    by: str | None = "plate",
) -> pd.DataFrame:
    """Normalise features of each plate (``by``) against its negative-control wells with ``pycytominer.normalize``.

    ``mad_robustize`` subtracts the controls' median and divides by their scaled MAD, ``standardize`` uses mean and
    standard deviation, ``spherize`` whitens (ZCA-cor) on the controls (pycytominer; Way et al., JOSS 2022).
    ``by=None`` fits one transform on all controls.
    """
    if method not in NORMALISATIONS:
        raise DinoscopeError(
            f"unknown normalisation {method!r}", field="normalise", fix=f"use one of {', '.join(NORMALISATIONS)}"
        )
    column = meta_column(control_column)
    if column not in profiles.columns:
        raise DinoscopeError(
            f"no control column {control_column!r} in the profiles",
            field=control_column,
            fix="pass --control-column naming a plate-map column (e.g. role)",
        )
    is_control = profiles[column].astype(str) == str(control_value)
    if not is_control.any():
        raise DinoscopeError(
            f"no well has {control_column} == {control_value!r}",
            field=control_column,
            fix="mark negative-control wells in the plate map, or pass --control-value",
        )
    if method == "none":
        return profiles.copy()
    features, meta = feature_columns(profiles), metadata_columns(profiles)
    query = f"`{column}` == {str(control_value)!r}"
    groups = profiles.groupby(meta_column(by), sort=False) if by else [("all", profiles)]
    parts = []
    for name, group in groups:
        n_controls = int(is_control[group.index].sum())
        if n_controls < 2:
            raise DinoscopeError(
                f"plate {name!r} has {n_controls} control well(s); normalisation needs >= 2",
                field=control_column,
                fix="add control wells to that plate, or drop the plate",
            )
        try:
            parts.append(normalize(profiles=group, features=features, meta_features=meta, samples=query, method=method))
        except ValueError as err:
            raise DinoscopeError(
                f"{method} failed on plate {name!r}: {err}",
                field="normalise",
                fix="use mad_robustize, or more control wells for spherize",
            ) from err
    out = pd.concat(parts).loc[profiles.index]
    out[features] = out[features].astype(np.float32)
    return out


def treatment_consensus(
    profiles: pd.DataFrame, *, treatment_column: str = "treatment", operation: str = "median"
) -> pd.DataFrame:
    """One consensus profile per treatment (``pycytominer.consensus``), keeping metadata constant per treatment."""
    column = meta_column(treatment_column)
    if column not in profiles.columns:
        raise DinoscopeError(
            f"no treatment column {treatment_column!r}",
            field=treatment_column,
            fix="the plate map needs a treatment column",
        )
    per_well = {meta_column("plate"), meta_column("well"), "Metadata_n_cells", column}
    filled = profiles.copy()
    constant = []
    for c in metadata_columns(profiles):
        if c not in per_well and (filled.groupby(column)[c].nunique(dropna=False) <= 1).all():
            filled[c] = filled[c].fillna("")  # groupby would drop treatments whose annotation is missing
            constant.append(c)
    out = consensus(
        filled, replicate_columns=[column] + constant, operation=operation, features=feature_columns(profiles)
    )
    sizes = profiles.groupby(column).agg(Metadata_n_wells=(column, "size"))
    if "Metadata_n_cells" in profiles.columns:
        sizes["Metadata_n_cells"] = profiles.groupby(column)["Metadata_n_cells"].sum()
    out = out.merge(sizes, left_on=column, right_index=True)
    return out[metadata_columns(out) + feature_columns(out)].reset_index(drop=True)
