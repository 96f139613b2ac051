"""``dinoscope cells ...``: the cell sub-commands, declared once each from their schemas (:mod:`bio.config`) and run
by :mod:`bio.services`. :mod:`core.cli.adapter` builds the parsers, so every sub-command also takes
``--recipe FILE``, ``--set``, trailing ``key=value`` overrides and ``--print-recipe``.

    dinoscope cells synth data/screen
    dinoscope cells embed plate1.ome.zarr plate2.ome.zarr --weights backbone.safetensors --out RUN
    dinoscope cells embed --recipe recipes/tiny/cells_embed.yaml model.batch_size=64
    torchrun --nproc_per_node=4 -m core.cli cells embed plates/*.ome.zarr --weights w.safetensors --out RUN
    dinoscope cells fit-head RUN --platemap platemap.csv --label moa --out HEAD
    dinoscope cells profile RUN --platemap platemap.csv --out profiles.parquet
    dinoscope cells evaluate profiles.parquet --out eval/
"""

from __future__ import annotations

import argparse

from bio.config import CellsEmbedRecipe, CellsEvaluateCfg, CellsFitHeadCfg, CellsProfileCfg, CellsSynthCfg
from core.cli.adapter import Command, add_group

CELLS_COMMANDS: tuple[Command, ...] = (
    Command(
        "synth",
        "write a synthetic cell-painting screen (OME-Zarr plates + plate map)",
        "bio.services:synth",
        schema=CellsSynthCfg,
        description="Deterministic synthetic screen: 5 Cell Painting channels, active and inert treatments, DMSO "
        "controls on every plate, plate batch effects; writes plate<k>.ome.zarr, platemap.csv and a "
        "CellProfiler-style nuclei.csv.",
    ),
    Command(
        "embed",
        "per-cell embeddings of OME-Zarr plates or LoadData manifests",
        "bio.services:embed",
        schema=CellsEmbedRecipe,
        kinds=("cells_embed",),
        description="Crop every cell around its nucleus, embed the crops with a ViT backbone (channels matched by "
        "name) and write RUN/embeddings.zarr + RUN/cells.parquet. Resumable; under torchrun the fields are spread "
        "over the ranks.",
        examples="examples:\n  dinoscope cells embed plate1.ome.zarr --weights backbone.safetensors --out RUN\n"
        "  dinoscope cells embed --recipe recipes/tiny/cells_embed.yaml model.n_last_blocks=4",
    ),
    Command(
        "fit-head",
        "train a phenotype classifier on cell embeddings",
        "bio.services:train_head",
        schema=CellsFitHeadCfg,
        description="Train a linear phenotype head on RUN's cell embeddings with a plate-map label (treatment or "
        "moa); wells are split into train and held-out sets; writes OUT/head.safetensors, OUT/head.json and "
        "OUT/metrics.json (held-out macro-F1).",
    ),
    Command(
        "profile",
        "aggregate cell embeddings into normalised well profiles",
        "bio.services:profile",
        schema=CellsProfileCfg,
        description="Aggregate per-cell embeddings of RUN into well profiles, join the plate map, normalise each "
        "plate against its negative controls and write Parquet.",
    ),
    Command(
        "evaluate",
        "mAP, kNN and batch-separation metrics for profiles",
        "bio.services:evaluate",
        schema=CellsEvaluateCfg,
        description="Score profiles: copairs mAP (activity vs controls, consistency by annotation), not-same-batch "
        "kNN, 1-NN macro-F1, plate separation; write metrics.json, figures and report.html into --out.",
    ),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Entry point ``dinoscope.commands: cells``: add ``dinoscope cells`` and its sub-commands."""
    add_group(subparsers, "cells", "cell-painting screens: embeddings, heads, profiles, evaluation", CELLS_COMMANDS)
