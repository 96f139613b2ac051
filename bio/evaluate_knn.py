"""kNN evaluation of well profiles: chunked cosine nearest neighbours, not-same-batch kNN, CHAMMI-style 1-NN
macro-F1, and plate-batch separation.

* kNN accuracy with not-same-compound (NSC) and not-same-batch (NSB / NSCB) hold-outs follows Ljosa et al.,
  J Biomol Screen 2013 and Ando et al., bioRxiv 161422 (2017). It runs in row chunks, so memory is
  O(chunk x N), never N x N.
* Macro-F1 of a 1-NN classifier is the CHAMMI protocol (Chen et al., NeurIPS 2023 Datasets & Benchmarks).
* Plate-batch separation is measured on negative-control wells, where biology is constant by design: the cosine
  silhouette of plate labels (Rousseeuw, J Comput Appl Math 1987) and the leave-one-out kNN accuracy of
  predicting the plate. Both drop towards chance when normalisation removes plate effects. They are computed only
  where they mean something: at least two batches, and k below the number of neighbours a control well can have
  (the other control wells); otherwise the result says ``not_applicable`` and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, silhouette_score

from bio.evaluate_columns import control_mask, has_text, require_column
from bio.profiles import feature_columns, meta_column

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


def batch_separation(
    profiles: pd.DataFrame,
    *,
    batch_column: str = "plate",
    control_column: str = "role",
    control_value: str = "negative_control",
    k: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """How well negative-control wells separate by plate: cosine silhouette and leave-one-out kNN accuracy.

    Returns ``{"not_applicable": reason}`` (with the counts) when fewer than two batches hold controls, when no batch
    repeats a control well, or when ``k`` is not below the number of possible neighbours (control wells - 1).
    """
    column = meta_column(batch_column)
    if column not in profiles.columns:
        return {"not_applicable": f"no batch column {column}"}
    is_control = control_mask(profiles, control_column, control_value)
    batches = profiles.loc[is_control, column].astype(str).to_numpy()
    n_batches = len(np.unique(batches))
    counts = {"n_control_wells": int(len(batches)), "n_batches": n_batches, "k": k}
    if n_batches < 2 or n_batches >= len(batches):
        why = f"needs >= 2 batches with repeated control wells; the controls come from {n_batches} batch(es)"
        return {**counts, "not_applicable": why}
    if k >= len(batches) - 1:
        why = (
            f"kNN with k={k} needs more than {k} neighbours, but each of the {len(batches)} control wells has "
            f"{len(batches) - 1}: its accuracy would mostly reflect batch sizes"
        )
        return {**counts, "not_applicable": why}
    x = _unit_rows(profiles.loc[is_control, feature_columns(profiles)].to_numpy())
    silhouette = silhouette_score(x, batches, metric="cosine", sample_size=min(len(x), 5000), random_state=seed)
    knn = knn_classify(x, batches, k=k)
    chance = float(pd.Series(batches).value_counts(normalize=True).max())
    return {**counts, "silhouette": float(silhouette), "knn_accuracy": knn["accuracy"], "chance_accuracy": chance}


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
    tcol = require_column(profiles, treatment_column)
    treated = ~control_mask(profiles, control_column, control_value)
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
        labelled = treated & has_text(profiles[acol])
        labels = profiles[acol].astype(str).to_numpy()
        out[f"{annotation_column}_nsc"] = knn_classify(
            feats, labels, k=k, queries=labelled, candidates=labelled, exclude_same=[treatments]
        )
        if batches is not None:
            out[f"{annotation_column}_nscb"] = knn_classify(
                feats, labels, k=k, queries=labelled, candidates=labelled, exclude_same=[treatments, batches]
            )
    return out
