"""``dinoscope cells embed`` and ``dinoscope cells fit-head``: argument parsing and handlers.

    dinoscope cells embed plate1.ome.zarr plate2.ome.zarr --weights backbone.safetensors --out RUN
    dinoscope cells embed --recipe recipes/tiny/cells_embed.yaml --set model.batch_size=64
    torchrun --nproc_per_node=4 -m core.cli cells embed plates/*.ome.zarr --weights w.safetensors --out RUN
    dinoscope cells fit-head RUN --platemap platemap.csv --label moa --out HEAD
    dinoscope cells embed plates/*.ome.zarr --weights w.safetensors --head HEAD --out RUN2

Every ``cells embed`` flag sets one key of :class:`bio.config.CellsEmbedRecipe`; with ``--recipe`` the flags and
``--set key=value`` items override the recipe, and the strict recipe loader checks the result.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# flag destination -> recipe key
_EMBED_KEYS = {
    "sources": "data.sources",
    "channels": "data.channels",
    "centroids": "data.centroids",
    "nuclei_table": "data.nuclei_table",
    "label_channel": "data.label_channel",
    "detect_channel": "data.detect_channel",
    "illumination": "data.illumination",
    "weights": "model.weights",
    "weights_channels": "model.weights_channels",
    "normalisation": "model.normalisation",
    "n_last_blocks": "model.n_last_blocks",
    "avgpool": "model.avgpool",
    "input_size": "model.input_size",
    "batch_size": "model.batch_size",
    "device": "model.device",
    "precision": "model.precision",
    "crop_size": "crops.size",
    "edge": "crops.edge",
    "out": "output.dir",
    "dtype": "output.dtype",
    "chunk_rows": "output.chunk_rows",
    "head": "output.head",
    "resume": "output.resume",
}


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def embed_overrides(args: argparse.Namespace) -> list[str]:
    """``key=value`` recipe overrides for the flags that were given (values JSON-quoted, so any path is safe)."""
    items = [
        f"{_EMBED_KEYS[dest]}={json.dumps(value)}"
        for dest, value in vars(args).items()
        if dest in _EMBED_KEYS and value not in (None, [])
    ]
    return items + list(args.overrides or [])


def _embed(args: argparse.Namespace) -> int:
    from bio.config import CellsEmbedRecipe
    from bio.kinds import run_embed
    from core.config import load_recipe

    recipe = load_recipe(CellsEmbedRecipe, args.recipe, embed_overrides(args))
    return run_embed(recipe, Path(recipe.output.dir))


def _fit_head(args: argparse.Namespace) -> int:
    from bio.heads import fit_head, save_head

    classifier, meta, metrics = fit_head(
        args.run,
        args.platemap,
        label=args.label,
        holdout_fraction=args.holdout_fraction,
        max_cells_per_well=args.max_cells_per_well,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        drop_edge_cells=args.drop_edge_cells,
        seed=args.seed,
    )
    path = save_head(classifier, meta, metrics, args.out)
    log.info(
        "held-out macro-F1 %.3f (cells), %.3f (wells); chance %.3f; wrote %s",
        metrics["macro_f1"],
        metrics["well_macro_f1"],
        metrics["chance_macro_f1"],
        path,
    )
    return 0


def add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="per-cell embeddings of OME-Zarr plates or LoadData manifests",
        description="Crop every cell around its nucleus, embed the crops with a ViT backbone "
        "(channels matched by name) and write RUN/embeddings.zarr + RUN/cells.parquet. Resumable; "
        "under torchrun the fields are spread over the ranks.",
    )
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="OME-Zarr plates (.zarr) and/or LoadData CSVs")
    p.add_argument("--recipe", help="a `kind: cells_embed` recipe; flags override it")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="KEY=VALUE",
        help="override any recipe key, e.g. --set model.n_last_blocks=4 (repeatable)",
    )
    p.add_argument("--weights", help="backbone weights (.safetensors + .json from `dinoscope export`, or .pth)")
    p.add_argument("--out", help="run directory (default: output.dir of the recipe)")
    p.add_argument("--channels", type=_names, help="channels to embed, comma-separated, in order (default: all)")
    p.add_argument(
        "--weights-channels",
        type=_names,
        help="names of a fixed-channel model's inputs in order, when the weights carry none",
    )
    p.add_argument(
        "--centroids", choices=("detect", "table", "labels"), help="where nuclei come from (default: detect)"
    )
    p.add_argument("--nuclei-table", help="CellProfiler nuclei CSV (Nuclei_Location_Center_X/Y) for --centroids table")
    p.add_argument("--label-channel", help="instance-mask channel or NGFF labels name for --centroids labels")
    p.add_argument("--detect-channel", help="nuclear stain for --centroids detect (default: DNA)")
    p.add_argument("--illumination", help=".npz flat-fields per channel to divide by")
    p.add_argument("--crop-size", type=int, help="crop side in pixels (default: 64)")
    p.add_argument("--edge", choices=("pad", "skip"), help="crops crossing the border: pad (flagged) or skip")
    p.add_argument(
        "--normalisation",
        choices=("auto", "zscore", "meta", "none"),
        help="per-crop z-score (Cell-DINO), the weights' mean/std, or none (default: auto)",
    )
    p.add_argument("--n-last-blocks", type=int, help="class tokens of this many last blocks (default: 1)")
    p.add_argument("--avgpool", action="store_const", const=True, help="append the mean patch token")
    p.add_argument("--input-size", type=int, help="resize crops to this side before the model")
    p.add_argument("--batch-size", type=int, help="crops per forward pass (default: 256)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="CUDA autocast precision")
    p.add_argument("--float16", dest="dtype", action="store_const", const="float16", help="store embeddings as float16")
    p.add_argument("--chunk-rows", type=int, help="rows per zarr chunk (default: about 8 MiB)")
    p.add_argument("--head", help="phenotype head from `dinoscope cells fit-head`: adds per-cell predictions")
    p.add_argument(
        "--no-resume",
        dest="resume",
        action="store_const",
        const=False,
        help="discard a previous run in --out and start over",
    )
    p.set_defaults(func=_embed)


def add_fit_head(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fit-head",
        help="train a phenotype classifier on cell embeddings",
        description="Train a linear phenotype head on RUN's cell embeddings with a plate-map label "
        "(treatment or moa); wells are split into train and held-out sets; writes "
        "OUT/head.safetensors, OUT/head.json and OUT/metrics.json (held-out macro-F1).",
    )
    p.add_argument("run", metavar="RUN", help="embedding run directory from `dinoscope cells embed`")
    p.add_argument("--platemap", required=True, help="CSV with plate, well, treatment, role (+ e.g. moa)")
    p.add_argument("--label", default="treatment", help="plate-map column to predict (default: treatment)")
    p.add_argument("--out", required=True, help="output directory for the head")
    p.add_argument("--holdout-fraction", type=float, default=0.25, help="share of each label's wells held out")
    p.add_argument("--max-cells-per-well", type=int, default=500, help="cells sampled per well")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--drop-edge-cells", action="store_true", help="skip cells flagged 'edge'")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_fit_head)
