"""Evaluation of well profiles: copairs mAP, not-same-batch kNN, CHAMMI-style 1-NN macro-F1, batch separation.

* Phenotypic activity and consistency use copairs mean average precision with permutation p-values and
  Benjamini-Hochberg q-values (Kalinin et al., "A versatile information retrieval framework for evaluating profile
  strength and similarity", Nat Commun 2025; repo cytomining/copairs).
* kNN accuracy with not-same-compound (NSC) and not-same-batch (NSB / NSCB) hold-outs follows Ljosa et al.,
  J Biomol Screen 2013 and Ando et al., bioRxiv 161422 (2017). It runs in row chunks, so memory is
  O(chunk x N), never N x N.
* Macro-F1 of a 1-NN classifier is the CHAMMI protocol (Chen et al., NeurIPS 2023 Datasets & Benchmarks).
* Plate-batch separation is measured on negative-control wells, where biology is constant by design: the cosine
  silhouette of plate labels (Rousseeuw, J Comput Appl Math 1987) and the leave-one-out kNN accuracy of
  predicting the plate. Both drop towards chance when normalisation removes plate effects.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bio.profiles import feature_columns, meta_column, metadata_columns, read_profiles
from core.errors import DinoscopeError
from core.io import write_json

_REFERENCE = "Metadata_copairs_reference"
_NEIGHBOUR_BLOCK = 2**24  # similarity entries per chunk (64 MiB of float32)


def _unit_rows(feats: np.ndarray) -> np.ndarray:
    x = np.asarray(feats, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def nearest_neighbours(
    feats: np.ndarray,
    k: int,
    *,
    queries: np.ndarray | None = None,
    candidates: np.ndarray | None = None,
    exclude_same: Sequence[np.ndarray] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine k nearest neighbours, computed in row chunks.

    Args:
        feats: ``[N, D]`` features.
        k: neighbours per query.
        queries, candidates: boolean masks over rows (default: all rows).
        exclude_same: integer group codes ``[N]``; a candidate sharing any code with the query is skipped
            (e.g. plate codes for not-same-batch). A query never retrieves itself.

    Returns:
        ``(query_rows [Q], neighbours [Q, k])``; neighbour rows sorted by similarity, ``-1`` where none is allowed.
    """
    n = len(feats)
    x = _unit_rows(feats)
    q_rows = np.flatnonzero(np.ones(n, bool) if queries is None else queries)
    c_rows = np.flatnonzero(np.ones(n, bool) if candidates is None else candidates)
    out = np.full((len(q_rows), k), -1, np.int64)
    if len(c_rows) == 0 or len(q_rows) == 0:
        return q_rows, out
    k_eff = min(k, len(c_rows))
    xc = x[c_rows]
    step = max(1, _NEIGHBOUR_BLOCK // len(c_rows))
    for s in range(0, len(q_rows), step):
        qi = q_rows[s : s + step]
        sims = x[qi] @ xc.T  # chunk x n_candidates
        forbid = qi[:, None] == c_rows[None, :]
        for codes in exclude_same:
            forbid |= codes[qi][:, None] == codes[c_rows][None, :]
        sims[forbid] = -np.inf
        # argmax is ~50x faster than argpartition for the common 1-NN case
        top = sims.argmax(axis=1)[:, None] if k_eff == 1 else np.argpartition(sims, -k_eff, axis=1)[:, -k_eff:]
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        top, top_sims = np.take_along_axis(top, order, 1), np.take_along_axis(top_sims, order, 1)
        out[s : s + len(qi), :k_eff] = np.where(np.isfinite(top_sims), c_rows[top], -1)
    return q_rows, out


def knn_classify(
    feats: np.ndarray,
    labels: np.ndarray,
    *,
    k: int = 1,
    queries: np.ndarray | None = None,
    candidates: np.ndarray | None = None,
    exclude_same: Sequence[np.ndarray] = (),
) -> dict[str, Any]:
    """Majority-vote kNN (ties go to the nearer class); returns accuracy and macro-F1 over queries."""
    from sklearn.metrics import f1_score

    codes, _ = pd.factorize(pd.Series(labels), sort=True)
    q_rows, neighbours = nearest_neighbours(feats, k, queries=queries, candidates=candidates, exclude_same=exclude_same)
    truth, pred = [], []
    for row, nbrs in zip(q_rows, neighbours, strict=False):
        votes = codes[nbrs[nbrs >= 0]]
        if len(votes) == 0:
            continue
        tally = np.bincount(votes)
        pred.append(next(v for v in votes if tally[v] == tally.max()))
        truth.append(codes[row])
    result: dict[str, Any] = {"k": k, "n_queries": len(truth), "n_without_neighbour": len(q_rows) - len(truth)}
    if not truth:
        return {**result, "accuracy": None, "macro_f1": None}
    truth_arr, pred_arr = np.asarray(truth), np.asarray(pred)
    result["accuracy"] = float((truth_arr == pred_arr).mean())
    result["macro_f1"] = float(
        f1_score(truth_arr, pred_arr, labels=np.unique(truth_arr), average="macro", zero_division=0)
    )
    return result


def _controls(profiles: pd.DataFrame, control_column: str, control_value: str) -> np.ndarray:
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


def batch_separation(
    profiles: pd.DataFrame,
    *,
    batch_column: str = "plate",
    control_column: str = "role",
    control_value: str = "negative_control",
    k: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """How well negative-control wells separate by plate: cosine silhouette and leave-one-out kNN accuracy."""
    from sklearn.metrics import silhouette_score

    column = meta_column(batch_column)
    if column not in profiles.columns:
        return {"skipped": f"no batch column {column}"}
    is_control = _controls(profiles, control_column, control_value)
    batches = profiles.loc[is_control, column].astype(str).to_numpy()
    n_batches = len(np.unique(batches))
    if n_batches < 2 or n_batches >= len(batches):
        return {"skipped": f"need >= 2 batches with repeated control wells, got {n_batches} batch(es)"}
    x = _unit_rows(profiles.loc[is_control, feature_columns(profiles)].to_numpy())
    silhouette = silhouette_score(x, batches, metric="cosine", sample_size=min(len(x), 5000), random_state=seed)
    knn = knn_classify(x, batches, k=k)
    chance = float(pd.Series(batches).value_counts(normalize=True).max())
    return {
        "n_control_wells": int(len(x)),
        "n_batches": n_batches,
        "silhouette": float(silhouette),
        "knn_accuracy": knn["accuracy"],
        "chance_accuracy": chance,
        "k": k,
    }


def _map_summary(maps: pd.DataFrame, label: str, threshold: float) -> dict[str, Any]:
    table = maps.drop(columns=["indices"], errors="ignore").rename(columns={label: "label"})
    return {
        "n": int(len(table)),
        "mean_map": float(table["mean_average_precision"].mean()),
        "fraction_retrieved": float(table["below_corrected_p"].mean()),
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
) -> dict[str, Any]:
    """copairs mAP of each treatment's replicate wells retrieved against negative-control wells.

    Negatives are restricted to controls of the same plate (``match_controls_by``), which is also what keeps the
    pair count linear in the number of profiles. Returns per-treatment mAP, p and q values and the fraction of
    treatments retrieved at q < ``threshold``.
    """
    from copairs.map import average_precision, mean_average_precision
    from copairs.matching import UnpairedException, assign_reference_index

    tcol = _require(profiles, treatment_column)
    is_control = _controls(profiles, control_column, control_value)
    if not _has_text(profiles[tcol]).all():
        raise DinoscopeError(
            f"{int((~_has_text(profiles[tcol])).sum())} profile(s) have a missing treatment",
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
    summary = _map_summary(maps, tcol, threshold)
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
    from copairs.map import average_precision, mean_average_precision, multilabel
    from copairs.matching import UnpairedException
    from pycytominer import consensus

    acol = meta_column(annotation_column)
    if acol not in profiles.columns:
        return {"skipped": f"no annotation column {acol}"}
    tcol = _require(profiles, treatment_column)
    keep = ~_controls(profiles, control_column, control_value) & _has_text(profiles[acol])
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
    summary = _map_summary(maps, acol, threshold)
    summary.update(annotation=acol, n_treatments=int(len(cons)), active_only=active is not None)
    return summary


def knn_metrics(
    profiles: pd.DataFrame,
    *,
    treatment_column: str = "treatment",
    control_column: str = "role",
    control_value: str = "negative_control",
    batch_column: str = "plate",
    annotation_column: str | None = "moa",
    k: int = 1,
) -> dict[str, Any]:
    """Not-same-batch kNN of treatment, and NSC / NSCB kNN of the annotation; accuracy and macro-F1 each."""
    tcol = _require(profiles, treatment_column)
    treated = ~_controls(profiles, control_column, control_value)
    feats = profiles[feature_columns(profiles)].to_numpy(np.float32)
    treatments = pd.factorize(profiles[tcol])[0]
    bcol = meta_column(batch_column)
    batches = pd.factorize(profiles[bcol].astype(str))[0] if bcol in profiles.columns else None
    out: dict[str, Any] = {}
    if batches is None:
        out["treatment_nsb"] = {"skipped": f"no batch column {bcol}"}
    else:
        out["treatment_nsb"] = knn_classify(
            feats, profiles[tcol].to_numpy(), k=k, queries=treated, candidates=treated, exclude_same=[batches]
        )
    acol = meta_column(annotation_column) if annotation_column else None
    if acol and acol in profiles.columns:
        labelled = treated & _has_text(profiles[acol])
        labels = profiles[acol].astype(str).to_numpy()
        out[f"{annotation_column}_nsc"] = knn_classify(
            feats, labels, k=k, queries=labelled, candidates=labelled, exclude_same=[treatments]
        )
        if batches is not None:
            out[f"{annotation_column}_nscb"] = knn_classify(
                feats, labels, k=k, queries=labelled, candidates=labelled, exclude_same=[treatments, batches]
            )
    return out


def _require(profiles: pd.DataFrame, name: str) -> str:
    column = meta_column(name)
    if column not in profiles.columns:
        raise DinoscopeError(
            f"profiles have no column {column!r}; they have {metadata_columns(profiles)}",
            field=name,
            fix="pass the right column name or re-run `dinoscope cells profile`",
        )
    return column


def _has_text(values: pd.Series) -> np.ndarray:
    return (values.notna() & (values.astype(str).str.strip() != "")).to_numpy()


def _json_safe(obj: Any) -> Any:
    """NaN/inf become null and numpy scalars plain Python, so metrics.json is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def evaluate_profiles(
    profiles_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    treatment_column: str = "treatment",
    control_column: str = "role",
    control_value: str = "negative_control",
    batch_column: str = "plate",
    annotation_column: str = "moa",
    null_size: int = 10000,
    threshold: float = 0.05,
    knn_k: int = 1,
    seed: int = 0,
    batch_size: int = 20000,
    plots: bool = True,
) -> dict[str, Any]:
    """Run every evaluation on a profiles Parquet and write ``metrics.json``, plots and ``report.html``."""
    from bio import plots as plotting

    profiles, provenance = read_profiles(profiles_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _require(profiles, treatment_column)
    _controls(profiles, control_column, control_value)
    common = dict(treatment_column=treatment_column, control_column=control_column, control_value=control_value)
    with tempfile.TemporaryDirectory(prefix="copairs-null-") as cache:
        stats = dict(null_size=null_size, threshold=threshold, seed=seed, batch_size=batch_size, cache_dir=cache)
        activity = phenotypic_activity(profiles, match_controls_by=batch_column, **common, **stats)
        # without replicate wells (treatment-level profiles) activity is unknown: use every treatment
        active = (
            None if "skipped" in activity else [r["label"] for r in activity["per_label"] if r["below_corrected_p"]]
        )
        consistency = phenotypic_consistency(profiles, active, annotation_column=annotation_column, **common, **stats)
    metrics: dict[str, Any] = {
        "profiles": str(profiles_path),
        "n_profiles": int(len(profiles)),
        "n_features": len(feature_columns(profiles)),
        "provenance": provenance,
        "activity": activity,
        "consistency": consistency,
        "knn": knn_metrics(profiles, batch_column=batch_column, annotation_column=annotation_column, k=knn_k, **common),
        "batch_separation": {
            "profiles": batch_separation(
                profiles,
                batch_column=batch_column,
                control_column=control_column,
                control_value=control_value,
                seed=seed,
            ),
            **provenance.get("batch_separation", {}),
        },
    }
    metrics = _json_safe(metrics)
    if plots:
        metrics["figures"] = plotting.write_figures(
            profiles,
            metrics,
            out,
            treatment_column=treatment_column,
            control_column=control_column,
            control_value=control_value,
        )
    write_json(out / "metrics.json", metrics)
    if plots:
        plotting.write_report(metrics, out / "report.html")
    return metrics
