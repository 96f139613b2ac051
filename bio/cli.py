"""``dinoscope cells ...``: the cell sub-commands, declared once each from their schemas (:mod:`bio.config`) and run
by :mod:`bio.services`. :mod:`core.cli.adapter` builds the parsers, so every sub-command also takes
``--recipe FILE``, ``--set``, trailing ``key=value`` overrides and ``--print-recipe``.

    dinoscope cells synth data/screen
    dinoscope cells embed plate1.ome.zarr plate2.ome.zarr --weights backbone.safetensors --out RUN
    dinoscope cells embed images/ --channels DNA,ER,RNA,AGP,Mito --weights w.pth --out RUN --format anndata
    dinoscope cells embed --recipe recipes/tiny/cells_embed.yaml model.batch_size=64
    torchrun --nproc_per_node=4 -m core.cli cells embed plates/*.ome.zarr --weights w.safetensors --out RUN
    dinoscope cells fit-head RUN --platemap platemap.csv --label moa --out HEAD
    dinoscope cells profile RUN --platemap platemap.csv --out profiles.parquet --qc
    dinoscope cells profile RUN --platemap jump_platemap.csv --treatment-column Metadata_pert_iname \
        --control-column Metadata_control_type --control-value negcon --feature-prefix Cells_DINO_ --out p.parquet
    dinoscope cells evaluate profiles.parquet --out eval/       # eval/activity.csv is the hit list
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
        "controls on every plate, plate batch effects, optionally planted blurred fields and saturated wells; writes "
        "plate<k>.ome.zarr, platemap.csv, a CellProfiler-style nuclei.csv and planted.json.",
    ),
    Command(
        "embed",
        "per-cell embeddings of OME-Zarr plates, LoadData manifests or OME-TIFF files",
        "bio.services:embed",
        schema=CellsEmbedRecipe,
        kinds=("cells_embed",),
        description="Crop every cell around its nucleus, flag it for quality control (focus, saturation, debris, "
        "edge), embed the crops with a ViT backbone (channels matched by name) and write RUN/embeddings.zarr + "
        "RUN/cells.parquet (and RUN/cells.h5ad with --format anndata). Sources: OME-Zarr plates, LoadData CSVs "
        "(FileName_OrigDNA is channel DNA), multi-channel (OME-)TIFF files, folders of them (plate, well and site "
        "from the file names, see --name-pattern) and image-list CSVs (file, plate, well, site). Resumable; under "
        "torchrun the fields are spread over the ranks.",
        examples="examples:\n  dinoscope cells embed plate1.ome.zarr --weights backbone.safetensors --out RUN\n"
        "  dinoscope cells embed tiffs/ --channels DNA,ER,RNA,AGP,Mito --weights w.pth --out RUN --format anndata\n"
        "  dinoscope cells embed load_data.csv --channel-map OrigDNA=Hoechst --detect-channel Hoechst ...\n"
        "  dinoscope cells embed --recipe recipes/tiny/cells_embed.yaml model.n_last_blocks=4",
    ),
    Command(
        "fit-head",
        "train a phenotype classifier on cell embeddings",
        "bio.services:train_head",
        schema=CellsFitHeadCfg,
        description="Train a linear phenotype head on RUN's cell embeddings with a plate-map label (treatment, moa, "
        "or JUMP's Metadata_pert_iname); wells are split into train and held-out sets; writes OUT/head.safetensors, "
        "OUT/head.json and OUT/metrics.json (held-out macro-F1).",
    ),
    Command(
        "profile",
        "aggregate cell embeddings into normalised well profiles",
        "bio.services:profile",
        schema=CellsProfileCfg,
        description="Aggregate per-cell embeddings of RUN into well profiles (--qc leaves out flagged cells), join "
        "the plate map (ours or JUMP's Metadata_ columns, named by the column flags), normalise each plate against "
        "its negative controls and write Parquet with JUMP metadata columns (Metadata_Plate, Metadata_Well, ...). "
        "Wells missing from the plate map are an error unless --allow-missing-wells.",
    ),
    Command(
        "evaluate",
        "mAP, kNN and batch-separation metrics for profiles",
        "bio.services:evaluate",
        schema=CellsEvaluateCfg,
        description="Score profiles: copairs mAP (activity vs controls, consistency by annotation), not-same-batch "
        "kNN, 1-NN macro-F1, plate separation; write the hit list activity.csv, consistency.csv, metrics.json, "
        "figures and report.html into --out. Treatment and control columns default to those `cells profile` used.",
    ),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Entry point ``dinoscope.commands: cells``: add ``dinoscope cells`` and its sub-commands."""
    add_group(subparsers, "cells", "cell-painting screens: embeddings, heads, profiles, evaluation", CELLS_COMMANDS)
