"""The cell commands' services: each takes its typed recipe (:mod:`bio.config`), does the work and reports.

``dinoscope cells ...`` (declared in :mod:`bio.cli`) and ``dinoscope launch`` (:mod:`bio.kinds`) both run these, so
a recipe file and the equivalent flags do exactly the same thing. The signature ``(recipe, options, invocation)``
is the one :mod:`core.cli.adapter` calls.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bio.config import (
    CellsEmbedRecipe,
    CellsEvaluateCfg,
    CellsFitHeadCfg,
    CellsProfileCfg,
    CellsProfileRecipe,
    CellsSynthCfg,
    channel_map_of,
)
from bio.embed import embed_plate
from bio.evaluate import evaluate_profiles
from bio.heads import fit_head, save_head
from bio.profiling import build_profiles
from bio.qc import QcThresholds
from bio.synthetic import make_plate

log = logging.getLogger(__name__)


def synth(cfg: CellsSynthCfg, options: None = None, invocation: Any = None) -> int:
    """Write a synthetic screen (OME-Zarr plates, plate map, CellProfiler-style nuclei table); print the paths."""
    screen = make_plate(
        cfg.out,
        n_rows=cfg.rows,
        n_cols=cfg.cols,
        fields=cfg.fields,
        size=cfg.size,
        seed=cfg.seed,
        plates=cfg.plates,
        version=cfg.ngff,
        blurred_fields=cfg.blurred_fields,
        saturated_wells=cfg.saturated_wells,
    )
    for path in [*screen.plates, screen.platemap, screen.nuclei]:
        print(path)
    return 0


def embed(recipe: CellsEmbedRecipe, options: None = None, invocation: Any = None) -> int:
    """``dinoscope cells embed``: :func:`embed_into` the recipe's ``output.dir``."""
    return embed_into(recipe, Path(recipe.output.dir))


def embed_into(recipe: CellsEmbedRecipe, run_dir: Path) -> int:
    """Embed every cell of the recipe's plates into ``run_dir``; under torchrun each rank takes its share of the
    fields (``dinoscope launch`` runs this in every rank)."""
    d, m, c, o, q = recipe.data, recipe.model, recipe.crops, recipe.output, recipe.qc
    embed_plate(
        d.sources,
        run_dir,
        weights=m.weights,
        channels=d.channels or None,
        weights_channels=m.weights_channels or None,
        centroids=d.centroids,
        nuclei_table=d.nuclei_table or None,
        label_channel=d.label_channel or None,
        detect_channel=d.detect_channel,
        crop_size=c.size,
        edge=c.edge,
        batch_size=m.batch_size,
        normalisation=m.normalisation,
        n_last_blocks=m.n_last_blocks,
        avgpool=m.avgpool,
        input_size=m.input_size or None,
        dtype=o.dtype,
        chunk_rows=o.chunk_rows,
        head=o.head or None,
        illumination=d.illumination or None,
        device=m.device,
        precision=m.precision,
        resume=o.resume,
        overwrite=o.overwrite,
        channel_map=channel_map_of(d.channel_map),
        name_pattern=d.name_pattern,
        qc=QcThresholds(min_focus_ratio=q.min_focus_ratio, max_saturated=q.max_saturated, debris_fold=q.debris_fold),
        output_format=o.format,
    )
    return 0


def train_head(cfg: CellsFitHeadCfg, options: None = None, invocation: Any = None) -> int:
    """Fit a phenotype head on held-in wells; log its held-out macro-F1 next to chance and save it."""
    classifier, meta, metrics = fit_head(
        cfg.run,
        cfg.platemap,
        label=cfg.label,
        holdout_fraction=cfg.holdout_fraction,
        max_cells_per_well=cfg.max_cells_per_well,
        epochs=cfg.epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        drop_edge_cells=cfg.drop_edge_cells,
        seed=cfg.seed,
        allow_missing_wells=cfg.allow_missing_wells,
    )
    path = save_head(classifier, meta, metrics, cfg.out)
    log.info(
        "held-out macro-F1 %.3f (cells), %.3f (wells); chance %.3f; wrote %s",
        metrics["macro_f1"],
        metrics["well_macro_f1"],
        metrics["chance_macro_f1"],
        path,
    )
    return 0


def profile(cfg: CellsProfileCfg, options: None = None, invocation: Any = None) -> int:
    """``dinoscope cells profile``: :func:`profile_into` the file ``cfg.out``."""
    return profile_into(cfg, Path(cfg.out))


def profile_into(cfg: CellsProfileCfg | CellsProfileRecipe, out: Path) -> int:
    """Aggregate, annotate and normalise the run's cells into the Parquet file ``out``; log the plate separation
    of the controls before and after normalisation."""
    provenance = build_profiles(
        cfg.run,
        cfg.platemap,
        out,
        aggregate=cfg.aggregate,
        normalise=cfg.normalise,
        normalise_by=cfg.normalise_by,
        level=cfg.level,
        treatment_column=cfg.treatment_column,
        control_column=cfg.control_column,
        control_value=cfg.control_value,
        drop_edge_cells=cfg.drop_edge_cells,
        qc=cfg.qc,
        allow_missing_wells=cfg.allow_missing_wells,
        feature_prefix=cfg.feature_prefix,
    )
    log.info(
        "wrote %d %s profiles (%d cells, D=%d) to %s",
        provenance["n_profiles"],
        cfg.level,
        provenance["n_cells"],
        provenance["dim"],
        out,
    )
    for stage, result in provenance["batch_separation"].items():
        if "silhouette" in result:
            log.info(
                "plate separation of controls %s: silhouette %.3f, kNN plate accuracy %.2f (chance %.2f)",
                stage.replace("_", " "),
                result["silhouette"],
                result["knn_accuracy"],
                result["chance_accuracy"],
            )
        else:
            log.info(
                "plate separation of controls %s: not applicable (%s)",
                stage.replace("_", " "),
                result["not_applicable"],
            )
    return 0


def evaluate(cfg: CellsEvaluateCfg, options: None = None, invocation: Any = None) -> int:
    """``dinoscope cells evaluate``: :func:`evaluate_into` the directory ``cfg.out``."""
    return evaluate_into(cfg, Path(cfg.profiles), Path(cfg.out))


def evaluate_into(cfg: CellsEvaluateCfg | CellsProfileRecipe, profiles: Path, out: Path) -> int:
    """Score ``profiles`` (copairs mAP, kNN, plate separation) into ``out``: metrics.json, figures, report.html."""
    metrics = evaluate_profiles(
        profiles,
        out,
        treatment_column=cfg.treatment_column,
        batch_column=cfg.batch_column,
        annotation_column=cfg.annotation_column,
        null_size=cfg.null_size,
        threshold=cfg.threshold,
        knn_k=cfg.knn_k,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        control_column=cfg.control_column,
        control_value=cfg.control_value,
        min_replicates=cfg.min_replicates,
    )
    settings = metrics["settings"]
    stored = [k for k, origin in settings["from"].items() if origin == "profiles"]
    if stored:
        log.info(
            "treatments in %s, controls where %s == %r (%s as `cells profile` stored them)",
            settings["treatment_column"],
            settings["control_column"],
            settings["control_value"],
            ", ".join(stored),
        )
    activity = metrics["activity"]
    if "skipped" in activity:
        log.info("activity mAP skipped: %s", activity["skipped"])
    else:
        log.info(
            "activity: mean mAP %.3f; %d of %d treatments are hits (q < %g, >= %d replicates); %d flagged with fewer "
            "replicates",
            activity["mean_map"],
            sum(bool(r["hit"]) for r in activity["per_label"]),
            activity["n"],
            activity["threshold"],
            activity["min_replicates"],
            activity["n_too_few_replicates"],
        )
    log.info("wrote %s", ", ".join(str(out / name) for name in [*metrics["tables"].values(), "metrics.json"]))
    return 0


def profile_and_evaluate(recipe: CellsProfileRecipe, run_dir: Path) -> int:
    """A ``cells_profile`` recipe: profiles into ``run_dir/profiles.parquet``, then metrics into ``run_dir/eval``."""
    profiles = Path(run_dir) / "profiles.parquet"
    profile_into(recipe, profiles)
    if recipe.evaluate:
        evaluate_into(recipe, profiles, Path(run_dir) / "eval")
    return 0
