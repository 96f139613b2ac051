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

:func:`evaluate_profiles` runs them all; the metrics live in :mod:`bio.evaluate_map` (copairs) and
:mod:`bio.evaluate_knn` (kNN, batch separation). Besides ``metrics.json``, figures and ``report.html`` it writes the
hit list ``activity.csv`` (one row per treatment, sorted by ``corrected_p_value``: ``treatment, n_replicates,
mean_average_precision, p_value, corrected_p_value, below_corrected_p`` in copairs' names, then ``hit`` and
``flag``) and ``consistency.csv`` (one row per annotation value, e.g. per MoA). Which columns hold treatments and
controls defaults to what ``cells profile`` recorded in the profiles. Everything is computed before anything is
written, so a failed evaluation leaves no partial output.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bio import plots as plotting
from bio.evaluate_columns import column_settings, control_mask, require_column
from bio.evaluate_knn import batch_separation, knn_metrics
from bio.evaluate_map import phenotypic_activity, phenotypic_consistency
from bio.profiles import feature_columns, read_profiles
from core.io import atomic_path, write_json

log = logging.getLogger(__name__)

ACTIVITY_COLUMNS = (
    "treatment",
    "n_replicates",
    "mean_average_precision",
    "p_value",
    "corrected_p_value",
    "below_corrected_p",
    "hit",
    "flag",
)
CONSISTENCY_COLUMNS = (
    "annotation",
    "n_treatments",
    "mean_average_precision",
    "p_value",
    "corrected_p_value",
    "below_corrected_p",
)


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
    treatment_column: str | None = None,
    control_column: str | None = None,
    control_value: str | None = None,
    batch_column: str = "plate",
    annotation_column: str = "moa",
    null_size: int = 10000,
    threshold: float = 0.05,
    knn_k: int = 1,
    seed: int = 0,
    batch_size: int = 20000,
    plots: bool = True,
    min_replicates: int = 3,
) -> dict[str, Any]:
    """Run every evaluation on a profiles Parquet and write ``metrics.json``, the hit lists, plots and ``report.html``.

    ``treatment_column``, ``control_column`` and ``control_value`` default (None or empty) to those ``cells profile``
    stored in the profiles; treatments with fewer than ``min_replicates`` replicate wells are never hits.

    Example::

        from bio import evaluate_profiles
        metrics = evaluate_profiles("profiles.parquet", "eval/", annotation_column="moa", null_size=1000)
        metrics["activity"]["mean_map"], metrics["consistency"]
    """
    profiles, provenance = read_profiles(profiles_path)
    out = Path(out_dir)
    common, origin = column_settings(
        provenance, treatment_column=treatment_column, control_column=control_column, control_value=control_value
    )
    treatment_column, control_column, control_value = (
        common["treatment_column"],
        common["control_column"],
        common["control_value"],
    )
    require_column(profiles, treatment_column)
    control_mask(profiles, control_column, control_value)
    with tempfile.TemporaryDirectory(prefix="copairs-null-") as cache:
        stats = dict(null_size=null_size, threshold=threshold, seed=seed, batch_size=batch_size, cache_dir=cache)
        activity = phenotypic_activity(
            profiles, match_controls_by=batch_column, min_replicates=min_replicates, **common, **stats
        )
        # without replicate wells (treatment-level profiles) activity is unknown: use every treatment
        active = None if "skipped" in activity else [r["label"] for r in activity["per_label"] if r["hit"]]
        consistency = phenotypic_consistency(profiles, active, annotation_column=annotation_column, **common, **stats)
    metrics: dict[str, Any] = {
        "profiles": str(profiles_path),
        "n_profiles": int(len(profiles)),
        "n_features": len(feature_columns(profiles)),
        "settings": {**common, "from": origin},
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
    out.mkdir(parents=True, exist_ok=True)
    metrics["tables"] = _write_tables(metrics, out)
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


def _write_tables(metrics: dict[str, Any], out: Path) -> dict[str, str]:
    """``activity.csv`` and ``consistency.csv`` from the per-label results (atomically); returns what was written."""
    written = {}
    for key, name, columns in (
        ("activity", "treatment", ACTIVITY_COLUMNS),
        ("consistency", "annotation", CONSISTENCY_COLUMNS),
    ):
        rows = metrics[key].get("per_label")
        if not rows:
            log.info("no %s.csv: %s", key, metrics[key].get("skipped", "no rows"))
            continue
        table = pd.DataFrame(rows).rename(columns={"label": name})
        table = table[[c for c in columns if c in table.columns]]
        with atomic_path(out / f"{key}.csv") as tmp:
            table.to_csv(tmp, index=False)
        written[key] = f"{key}.csv"
    return written
