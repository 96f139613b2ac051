"""Metadata-column lookups shared by the profile evaluations (:mod:`bio.evaluate_map`, :mod:`bio.evaluate_knn`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from bio.profiles import meta_column, metadata_columns
from core.errors import DinoscopeError


def require_column(profiles: pd.DataFrame, name: str) -> str:
    """The ``Metadata_<name>`` column of ``profiles``; a :class:`DinoscopeError` listing the columns if absent."""
    column = meta_column(name)
    if column not in profiles.columns:
        raise DinoscopeError(
            f"profiles have no column {column!r}; they have {metadata_columns(profiles)}",
            field=name,
            fix="pass the right column name or re-run `dinoscope cells profile`",
        )
    return column


def control_mask(profiles: pd.DataFrame, control_column: str, control_value: str) -> np.ndarray:
    """Boolean mask of the negative-control rows (``control_column == control_value``, compared as text).

    A missing column or a table without any control is a :class:`DinoscopeError`: every evaluation needs controls.
    """
    column = meta_column(control_column)
    if column not in profiles.columns:
        raise DinoscopeError(
            f"profiles have no control column {column!r}",
            field=control_column,
            fix="pass --control-column naming the plate-map role column",
        )
    is_control = (profiles[column].astype(str) == str(control_value)).to_numpy()
    if not is_control.any():
        raise DinoscopeError(
            f"no profile has {control_column} == {control_value!r}",
            field=control_column,
            fix="mark negative controls in the plate map, or pass --control-value",
        )
    return is_control


def has_text(values: pd.Series) -> np.ndarray:
    """Boolean mask of the entries that are neither missing nor blank (e.g. wells with an MoA annotation)."""
    return (values.notna() & (values.astype(str).str.strip() != "")).to_numpy()


DEFAULT_COLUMNS = {"treatment_column": "treatment", "control_column": "role", "control_value": "negative_control"}


def column_settings(provenance: dict[str, Any], **given: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """The treatment and control settings of an evaluation, and where each came from.

    A setting given (non-empty) wins; otherwise the one `cells profile` stored in the profiles' provenance; otherwise
    the default (``treatment``, ``role``, ``negative_control``). Returns ``(settings, {setting: "given" | "profiles"
    | "default"})``.
    """
    settings, origin = {}, {}
    for key, default in DEFAULT_COLUMNS.items():
        if given.get(key):
            settings[key], origin[key] = str(given[key]), "given"
        elif provenance.get(key):
            settings[key], origin[key] = str(provenance[key]), "profiles"
        else:
            settings[key], origin[key] = default, "default"
    return settings, origin
