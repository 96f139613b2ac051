"""The profiling service: per-cell embeddings -> well profiles annotated with the plate map, normalised against
controls (pycytominer-style ``mad_robustize``/``standardize``/``spherize``), optionally collapsed to treatment
consensus, written to Parquet with their provenance. Used by ``dinoscope cells profile`` and ``kind: cells_profile``.

The provenance records the settings `cells evaluate` needs (treatment and control columns, the control value, the
feature prefix), the plate-batch separation of the controls before and after normalisation, the wells that did not
match the plate map, and the per-well QC counts of :mod:`bio.qc`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from bio.evaluate_knn import batch_separation
from bio.profiles import FEATURE_PREFIX, check_feature_prefix, feature_columns, meta_column, write_profiles
from bio.profiles_aggregate import aggregate_wells, well_keys
from bio.profiles_normalise import normalise_profiles, treatment_consensus
from bio.profiles_platemap import annotate_wells, read_platemap
from bio.qc import well_counts
from core.errors import DinoscopeError

log = logging.getLogger(__name__)


def build_profiles(
    run_dir: str | os.PathLike,
    platemap_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    aggregate: str = "median",
    normalise: str = "mad_robustize",
    normalise_by: str = "plate",
    control_column: str = "role",
    control_value: str = "negative_control",
    level: str = "well",
    treatment_column: str = "treatment",
    drop_edge_cells: bool = False,
    qc: bool = False,
    allow_missing_wells: bool = False,
    feature_prefix: str = FEATURE_PREFIX,
) -> dict[str, Any]:
    """Aggregate, annotate, normalise (and optionally build treatment consensus); write Parquet atomically.

    Args:
        control_column, control_value, treatment_column: plate-map columns, with or without the ``Metadata_``
            prefix (JUMP: ``Metadata_control_type``, ``negcon``, ``Metadata_pert_iname``).
        qc: leave out cells with any QC flag (:mod:`bio.qc`).
        allow_missing_wells: drop wells the plate map lacks (and map wells without cells) instead of failing.
        feature_prefix: the stored feature columns' prefix (``Cells_DINO_`` for pycytominer's feature inference).

    Returns the provenance stored in the Parquet file (see the module docstring).

    Example::

        from bio import build_profiles, evaluate_profiles
        build_profiles("runs/embed", "platemap.csv", "profiles.parquet", normalise="mad_robustize")
        metrics = evaluate_profiles("profiles.parquet", "eval/")      # copairs mAP, kNN, report.html
        metrics["activity"]["fraction_retrieved"]
    """
    if feature_prefix != FEATURE_PREFIX:
        check_feature_prefix(feature_prefix)
    # read first: a bad plate map should fail before the long pass
    platemap = read_platemap(platemap_path, required=(treatment_column, control_column))
    wells = aggregate_wells(run_dir, operation=aggregate, drop_edge_cells=drop_edge_cells, qc=qc)
    try:
        wells, missing = annotate_wells(wells, platemap, allow_missing_wells=allow_missing_wells)
    except DinoscopeError as err:
        if not qc:
            raise
        raise DinoscopeError(f"{err.message}, after --qc dropped flagged cells", field=err.field, fix=err.fix) from None
    controls = dict(control_column=control_column, control_value=control_value)
    normalised = normalise_profiles(wells, method=normalise, by=None if normalise_by == "all" else "plate", **controls)
    separation = {
        "before_normalisation": batch_separation(wells, **controls),
        "after_normalisation": batch_separation(normalised, **controls),
    }
    profiles = (
        normalised
        if level == "well"
        else treatment_consensus(normalised, treatment_column=treatment_column, operation=aggregate)
    )
    counts = well_counts(Path(run_dir) / "cells.parquet", well_keys)
    provenance = {
        "run": str(run_dir),
        "platemap": str(platemap_path),
        "aggregate": aggregate,
        "normalise": normalise,
        "normalise_by": normalise_by,
        "control_column": meta_column(control_column),
        "control_value": control_value,
        "treatment_column": meta_column(treatment_column),
        "level": level,
        "drop_edge_cells": drop_edge_cells,
        "n_cells": int(wells["Metadata_n_cells"].sum()),
        "n_wells": int(len(wells)),
        "n_profiles": int(len(profiles)),
        "dim": len(feature_columns(profiles)),
        "batch_separation": separation,
        "missing_wells": missing,
        "qc": {"applied": qc, "per_well": counts.to_dict(orient="records")},
    }
    write_profiles(profiles, out, provenance=provenance, feature_prefix=feature_prefix)
    if qc:
        log.info(
            "QC dropped %d of %d cells (%s)",
            int(counts["n_flagged"].sum()),
            int(counts["n_cells"].sum()),
            ", ".join(f"{c.removeprefix('n_')} {int(counts[c].sum())}" for c in counts.columns[3:-1]),
        )
    return provenance
