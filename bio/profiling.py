"""The profiling service: per-cell embeddings -> well profiles annotated with the plate map, normalised against
controls (pycytominer-style ``mad_robustize``/``standardize``/``spherize``), optionally collapsed to treatment
consensus, written to Parquet with their provenance. Used by ``dinoscope cells profile`` and ``kind: cells_profile``.
"""

from __future__ import annotations

import os
from typing import Any

from bio.evaluate_knn import batch_separation
from bio.profiles import feature_columns, write_profiles
from bio.profiles_aggregate import aggregate_wells
from bio.profiles_normalise import normalise_profiles, treatment_consensus
from bio.profiles_platemap import annotate_wells, read_platemap


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
) -> dict[str, Any]:
    """Aggregate, annotate, normalise (and optionally build treatment consensus); write Parquet atomically.

    Returns the provenance stored in the Parquet file, which includes the plate-batch separation of the control
    wells before and after normalisation.

    Example::

        from bio import build_profiles, evaluate_profiles
        build_profiles("runs/embed", "platemap.csv", "profiles.parquet", normalise="mad_robustize")
        metrics = evaluate_profiles("profiles.parquet", "eval/")      # copairs mAP, kNN, report.html
        metrics["activity"]["fraction_retrieved"]
    """
    platemap = read_platemap(platemap_path)  # read first: a bad plate map should fail before the long pass
    wells = annotate_wells(aggregate_wells(run_dir, operation=aggregate, drop_edge_cells=drop_edge_cells), platemap)
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
    provenance = {
        "run": str(run_dir),
        "platemap": str(platemap_path),
        "aggregate": aggregate,
        "normalise": normalise,
        "normalise_by": normalise_by,
        "control_column": control_column,
        "control_value": control_value,
        "level": level,
        "drop_edge_cells": drop_edge_cells,
        "n_cells": int(wells["Metadata_n_cells"].sum()),
        "n_wells": int(len(wells)),
        "n_profiles": int(len(profiles)),
        "dim": len(feature_columns(profiles)),
        "batch_separation": separation,
    }
    write_profiles(profiles, out, provenance=provenance)
    return provenance
