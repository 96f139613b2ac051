"""copairs mean average precision of well profiles: phenotypic activity and phenotypic consistency.

Both use copairs mAP with permutation p-values and Benjamini-Hochberg q-values (Kalinin et al., "A versatile
information retrieval framework for evaluating profile strength and similarity", Nat Commun 2025; repo
cytomining/copairs). Per-label rows keep copairs' column names (``mean_average_precision``, ``p_value``,
``corrected_p_value``, ``below_corrected_p``) and are sorted by ``corrected_p_value``.

A hit needs replicates: a treatment with fewer than ``min_replicates`` replicate wells (3 by default) is flagged and
never called a hit (``hit`` is False), whatever its q-value, since the mAP of two wells rests on a single pair.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from copairs.map import average_precision, mean_average_precision, multilabel
from copairs.matching import UnpairedException, assign_reference_index
from pycytominer import consensus

from bio.evaluate_columns import control_mask, has_text, require_column
from bio.profiles import feature_columns, meta_column, metadata_columns
from core.errors import DinoscopeError

_REFERENCE = "Metadata_copairs_reference"


def _map_summary(maps: pd.DataFrame, label: str, threshold: float) -> dict[str, Any]:
    table = maps.drop(columns=["indices"], errors="ignore").rename(columns={label: "label"})
    if "hit" not in table.columns:
        table["hit"] = table["below_corrected_p"].astype(bool)
    table = table.sort_values(["corrected_p_value", "label"], kind="stable").reset_index(drop=True)
    return {
        "n": int(len(table)),
        "mean_map": float(table["mean_average_precision"].mean()),
        "fraction_retrieved": float(table["hit"].mean()),
        "threshold": threshold,
        "per_label": table.to_dict(orient="records"),
    }


def phenotypic_activity(
    profiles: pd.DataFrame,
    *,
    treatment_column: str = "treatment",
    control_column: str = "role",
    control_value: str = "negative_control",
    match_controls_by: str | None = "plate",
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
    batch_size: int = 20000,
    cache_dir: str | os.PathLike | None = None,
    min_replicates: int = 3,
) -> dict[str, Any]:
    """copairs mAP of each treatment's replicate wells retrieved against negative-control wells.

    Negatives are restricted to controls of the same plate (``match_controls_by``), which is also what keeps the
    pair count linear in the number of profiles. Returns per-treatment mAP, p and q values, ``n_replicates``,
    ``hit`` (q < ``threshold`` with at least ``min_replicates`` replicates) and ``flag`` (why a treatment cannot be
    a hit), and the fraction of treatments that are hits.
    """
    tcol = require_column(profiles, treatment_column)
    is_control = control_mask(profiles, control_column, control_value)
    if not has_text(profiles[tcol]).all():
        raise DinoscopeError(
            f"{int((~has_text(profiles[tcol])).sum())} profile(s) have a missing treatment",
            field=treatment_column,
            fix="fill the treatment of every well in the plate map",
        )
    meta = profiles[metadata_columns(profiles)].reset_index(drop=True)
    meta = assign_reference_index(meta, meta.index[is_control], reference_col=_REFERENCE)
    plate = meta_column(match_controls_by) if match_controls_by else None
    neg_sameby = [plate] if plate in meta.columns else []
    feats = profiles[feature_columns(profiles)].to_numpy(np.float32)
    try:
        ap = average_precision(
            meta,
            feats,
            [tcol, _REFERENCE],
            [],
            neg_sameby,
            [tcol, _REFERENCE],
            batch_size=batch_size,
            distance="cosine",
            progress_bar=False,
        )
    except UnpairedException as err:
        return {"skipped": f"no replicate/control pairs ({err}); activity needs >= 2 wells per treatment"}
    except ValueError as err:  # copairs rejects null metadata or NaN features
        raise DinoscopeError(
            f"copairs rejected the profiles: {err}",
            field="profiles",
            fix="drop profiles with missing metadata or NaN features",
        ) from err
    ap = ap.loc[~is_control]
    with_pairs = ap.loc[ap["n_pos_pairs"] > 0, tcol].unique()
    maps = mean_average_precision(
        ap, [tcol], null_size=null_size, threshold=threshold, seed=seed, progress_bar=False, cache_dir=cache_dir
    )
    maps["n_replicates"] = maps[tcol].map(meta.loc[~is_control, tcol].value_counts()).astype(int)
    few = maps["n_replicates"] < min_replicates
    maps["hit"] = maps["below_corrected_p"].astype(bool) & ~few
    maps["flag"] = np.where(few, f"fewer than {min_replicates} replicates: not called a hit", "")
    summary = _map_summary(maps, tcol, threshold)
    summary["min_replicates"] = min_replicates
    summary["n_too_few_replicates"] = int(few.sum())
    summary["negatives_matched_by"] = neg_sameby[0] if neg_sameby else None
    summary["n_without_replicates"] = int(meta.loc[~is_control, tcol].nunique() - len(with_pairs))
    return summary


def phenotypic_consistency(
    profiles: pd.DataFrame,
    active: Sequence[str] | None,
    *,
    annotation_column: str = "moa",
    treatment_column: str = "treatment",
    control_column: str = "role",
    control_value: str = "negative_control",
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
    batch_size: int = 20000,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """copairs mAP of treatments sharing an annotation (e.g. MoA), on treatment consensus profiles.

    Only ``active`` treatments are used when given (the copairs phenotypic-consistency recipe). Annotations with
    several labels separated by ``|`` use copairs' multilabel average precision.
    """
    acol = meta_column(annotation_column)
    if acol not in profiles.columns:
        return {"skipped": f"no annotation column {acol}"}
    tcol = require_column(profiles, treatment_column)
    keep = ~control_mask(profiles, control_column, control_value) & has_text(profiles[acol])
    if active is not None:
        keep &= profiles[tcol].isin(list(active)).to_numpy()
    if keep.sum() < 2:
        return {"skipped": "fewer than two annotated (active) treatments"}
    feats_cols = feature_columns(profiles)
    cons = consensus(profiles.loc[keep], replicate_columns=[tcol, acol], operation="median", features=feats_cols)
    meta = cons[[tcol, acol]].reset_index(drop=True)
    feats = cons[feats_cols].to_numpy(np.float32)
    is_multi = meta[acol].astype(str).str.contains("|", regex=False).any()
    try:
        if is_multi:
            meta[acol] = meta[acol].astype(str).str.split("|").map(lambda xs: [x.strip() for x in xs])
            ap = multilabel.average_precision(
                meta,
                feats,
                [acol],
                [],
                [],
                [acol],
                multilabel_col=acol,
                batch_size=batch_size,
                distance="cosine",
                progress_bar=False,
            )
        else:
            ap = average_precision(
                meta, feats, [acol], [], [], [acol], batch_size=batch_size, distance="cosine", progress_bar=False
            )
    except UnpairedException as err:
        return {"skipped": f"no two treatments share an annotation ({err})"}
    maps = mean_average_precision(
        ap, [acol], null_size=null_size, threshold=threshold, seed=seed, progress_bar=False, cache_dir=cache_dir
    )
    members = meta.explode(acol) if is_multi else meta
    maps["n_treatments"] = maps[acol].map(members[acol].value_counts()).fillna(0).astype(int)
    summary = _map_summary(maps, acol, threshold)
    summary.update(annotation=acol, n_treatments=int(len(cons)), active_only=active is not None)
    return summary
