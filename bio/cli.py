"""`dinoscope cells` sub-commands: embeddings and phenotype heads (:mod:`bio.cli_model`), well profiles from an
embedding run, and their evaluation.

    dinoscope cells embed plate.ome.zarr --weights backbone.safetensors --out RUN
    dinoscope cells fit-head RUN --platemap platemap.csv --label moa --out HEAD
    dinoscope cells profile RUN --platemap platemap.csv --out profiles.parquet
    dinoscope cells evaluate profiles.parquet --out eval/

Other cell commands plug in by adding a ``name -> add_parser`` entry to :data:`CELLS_COMMANDS`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

from bio.cli_model import add_embed, add_fit_head
from bio.profiling import build_profiles

log = logging.getLogger(__name__)


def _profile(args: argparse.Namespace) -> int:
    provenance = build_profiles(
        args.run,
        args.platemap,
        args.out,
        aggregate=args.aggregate,
        normalise=args.normalise,
        normalise_by=args.normalise_by,
        control_column=args.control_column,
        control_value=args.control_value,
        level=args.level,
        treatment_column=args.treatment_column,
        drop_edge_cells=args.drop_edge_cells,
    )
    log.info(
        "wrote %d %s profiles (%d cells, D=%d) to %s",
        provenance["n_profiles"],
        args.level,
        provenance["n_cells"],
        provenance["dim"],
        args.out,
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
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from bio.evaluate import evaluate_profiles

    metrics = evaluate_profiles(
        args.profiles,
        args.out,
        treatment_column=args.treatment_column,
        control_column=args.control_column,
        control_value=args.control_value,
        batch_column=args.batch_column,
        annotation_column=args.annotation_column,
        null_size=args.null_size,
        threshold=args.threshold,
        knn_k=args.knn_k,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    activity = metrics["activity"]
    if "skipped" in activity:
        log.info("activity mAP skipped: %s", activity["skipped"])
    else:
        log.info(
            "activity: mean mAP %.3f, %.0f%% of %d treatments retrieved at q < %g",
            activity["mean_map"],
            100 * activity["fraction_retrieved"],
            activity["n"],
            activity["threshold"],
        )
    log.info("wrote %s and %s", Path(args.out) / "metrics.json", Path(args.out) / "report.html")
    return 0


def _add_control_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control-column", default="role", help="plate-map column marking controls")
    parser.add_argument("--control-value", default="negative_control", help="value of negative-control wells")
    parser.add_argument("--treatment-column", default="treatment", help="plate-map column naming treatments")


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="aggregate cell embeddings into normalised well profiles",
        description="Aggregate per-cell embeddings of RUN into well profiles, join the plate map, "
        "normalise each plate against its negative controls and write Parquet.",
    )
    p.add_argument("run", metavar="RUN", help="embedding run directory (embeddings.zarr + cells.parquet)")
    p.add_argument("--platemap", required=True, help="CSV with plate, well, treatment, role (+ e.g. moa)")
    p.add_argument("--out", required=True, help="output profiles .parquet")
    p.add_argument(
        "--aggregate", choices=("median", "mean"), default="median", help="cells -> well statistic (default: median)"
    )
    p.add_argument(
        "--normalise",
        choices=("mad_robustize", "standardize", "spherize", "none"),
        default="mad_robustize",
        help="pycytominer method fitted on controls (default: mad_robustize)",
    )
    p.add_argument(
        "--normalise-by",
        choices=("plate", "all"),
        default="plate",
        help="fit the normalisation per plate (default) or once on all controls",
    )
    p.add_argument(
        "--level",
        choices=("well", "treatment"),
        default="well",
        help="write well profiles or treatment consensus profiles",
    )
    p.add_argument("--drop-edge-cells", action="store_true", help="skip cells flagged 'edge'")
    _add_control_options(p)
    p.set_defaults(func=_profile)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="mAP, kNN and batch-separation metrics for profiles",
        description="Score profiles: copairs mAP (activity vs controls, consistency by "
        "annotation), not-same-batch kNN, 1-NN macro-F1, plate separation; write metrics.json, "
        "figures and report.html into --out.",
    )
    p.add_argument("profiles", metavar="PROFILES", help="profiles .parquet from `dinoscope cells profile`")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-column", default="plate", help="column whose values define batches for NSB kNN")
    p.add_argument("--annotation-column", default="moa", help="annotation for consistency mAP (if present)")
    p.add_argument("--null-size", type=int, default=10000, help="permutations for mAP p-values")
    p.add_argument("--threshold", type=float, default=0.05, help="q-value threshold for 'retrieved'")
    p.add_argument("--knn-k", type=int, default=1, help="neighbours for kNN (1 = CHAMMI 1-NN)")
    p.add_argument("--batch-size", type=int, default=20000, help="pairs per copairs similarity batch")
    p.add_argument("--seed", type=int, default=0)
    _add_control_options(p)
    p.set_defaults(func=_evaluate)


def _cmd_synth(args: argparse.Namespace) -> int:
    from bio.synthetic import make_plate

    screen = make_plate(
        args.out,
        n_rows=args.rows,
        n_cols=args.cols,
        fields=args.fields,
        size=args.size,
        seed=args.seed,
        plates=args.plates,
        version=args.ngff,
    )
    for path in [*screen.plates, screen.platemap, screen.nuclei]:
        print(path)
    return 0


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic cell-painting screen (OME-Zarr plates + plate map)",
        description="Deterministic synthetic screen: 5 Cell Painting channels, active and inert "
        "treatments, DMSO controls on every plate, plate batch effects; writes plate<k>.ome.zarr, "
        "platemap.csv and a CellProfiler-style nuclei.csv.",
    )
    p.add_argument("out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plates", type=int, default=2)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--cols", type=int, default=6)
    p.add_argument("--fields", type=int, default=2)
    p.add_argument("--size", type=int, default=128, help="field side in pixels")
    p.add_argument("--ngff", choices=["0.4", "0.5"], default="0.5", help="OME-NGFF version")
    p.set_defaults(func=_cmd_synth)


CELLS_COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "synth": _add_synth,
    "embed": add_embed,
    "fit-head": add_fit_head,
    "profile": _add_profile,
    "evaluate": _add_evaluate,
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``dinoscope cells`` and its sub-commands to the ``dinoscope`` parser."""
    cells = subparsers.add_parser(
        "cells",
        help="cell-painting screens: embeddings, heads, profiles, evaluation",
        description="Cell-painting commands.",
    )
    sub = cells.add_subparsers(dest="cells_command", metavar="CELLS_COMMAND")
    sub.required = True
    for add in CELLS_COMMANDS.values():
        add(sub)
