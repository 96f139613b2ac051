"""Core's sub-commands, declared once each: name, schema, run switches, service. :mod:`core.cli.adapter` builds
their parsers; domain packages declare theirs the same way and plug in through the ``dinoscope.commands`` entry
points (``geodino.cli``, ``bio.cli``)."""

from __future__ import annotations

from core.cli.adapter import Command
from core.config.commands import (
    DemoCfg,
    ExportCfg,
    KnnEvalCfg,
    LaunchOptions,
    LinearEvalCfg,
    PretrainOptions,
    WeightsCfg,
    WeightsConvertCfg,
)
from core.config.curate import (
    CurateClusterCfg,
    CurateDedupCfg,
    CurateEmbedCfg,
    CurateRetrieveCfg,
    CurateSampleCfg,
)
from core.config.pretrain import PretrainRecipe
from core.launch.resources import LaunchResources

PRETRAIN = Command(
    "pretrain",
    "DINOv2 self-supervised pretraining (or distillation) from a recipe",
    "core.cli.pretrain:run_pretrain",
    schema=PretrainRecipe,
    options=PretrainOptions,
    recipe_positional=True,
    kinds=("pretrain", "distill"),
    description="Train (or resume) a DINOv2 recipe: DINO + iBOT + KoLeo with an EMA teacher, or distillation.",
    examples="examples:\n  dinoscope pretrain recipes/tiny/pretrain.yaml optim.epochs=2\n"
    "  torchrun --nproc_per_node=8 -m core.cli pretrain recipes/geo/pretrain_vitl14_zero2.yaml",
)
EXPORT = Command(
    "export",
    "write a run's teacher backbone as safetensors + JSON sidecar",
    "core.cli.pretrain:run_export",
    schema=ExportCfg,
    examples="example:\n  dinoscope export runs/tiny/pretrain out/backbone.safetensors",
)
EVAL = (
    Command(
        "knn",
        "weighted kNN (T=0.07) on class tokens",
        "core.cli.evaluate:run_knn",
        schema=KnnEvalCfg,
        examples="example:\n  dinoscope eval knn out/backbone.safetensors --kind synthetic_shapes "
        "--train n=400 seed=1 --val n=200 seed=2",
    ),
    Command(
        "linear",
        "linear probes on cls + avg-pooled patch tokens, lr grid",
        "core.cli.evaluate:run_linear",
        schema=LinearEvalCfg,
    ),
)
WEIGHTS = (
    Command(
        "inspect",
        "print architecture, channels, normalisation and format of weights",
        "core.cli.weights:run_inspect",
        schema=WeightsCfg,
    ),
    Command(
        "convert",
        "write weights in dinoscope's export format (safetensors + JSON)",
        "core.cli.weights:run_convert",
        schema=WeightsConvertCfg,
    ),
)
DEMO = Command(
    "demo",
    "the main job on embedded data: pretrain, evaluate, canopy and cells",
    "core.cli.demo:run_demo",
    schema=DemoCfg,
)
LAUNCH = Command(
    "launch",
    "validate a recipe, then run it locally, as N processes or on SLURM",
    "core.cli.launch:run_launch",
    options=LaunchOptions,
    prefixed=(("launch", LaunchResources),),
    recipe_positional=True,
    description="Validate a recipe of any kind completely (recipe, resources, batch-size rule, input paths), then "
    "run it in this process, as local processes (torchrun, deepspeed) or as a SLURM job (submitit). Overrides "
    "starting with launch. go to the resources (launch.qos=high), the others to the recipe.",
    examples="""examples:
  dinoscope launch recipes/tiny/pretrain.yaml                                       # tiny CPU run
  dinoscope launch recipes/cluster/pretrain_vitg14_16nodes.yaml \\
      --resources recipes/launch/slurm_16nodes_8gpus.yaml --account proj --dry-run  # 16 nodes x 8 GPUs
  # several machines without SLURM: the same command on every node, one node rank each
  dinoscope launch RECIPE --launcher torchrun --nodes 2 --nproc 8 --node-rank 0 --master-addr node0
  dinoscope launch RECIPE --launcher torchrun --nodes 2 --nproc 8 --node-rank 1 --master-addr node0
  # or let c10d assign the ranks: --rdzv-backend c10d --rdzv-endpoint node0:29400 on every node""",
)
CURATE = (
    Command(
        "embed",
        "embed a collection (image folders, GeoTIFF windows, cell crops) with a backbone, resumably",
        "core.cli.curate:run_embed",
        schema=CurateEmbedCfg,
        description="Embed every item of one or more SOURCEs of a dataset kind with a frozen backbone into "
        "RUN/embeddings.zarr and RUN/ids.parquet (id, source, item, path, window or cell). Resumable (chunks are "
        "committed as they finish) and rank-parallel under torchrun.",
        examples="examples:\n  dinoscope curate embed photos/ --weights backbone.safetensors --out runs/pool\n"
        "  dinoscope curate embed scenes/*.tif --kind geotiff --params window_size=224 length=50000 "
        "--weights w.safetensors --out runs/pool",
    ),
    Command(
        "dedup",
        "group near-duplicates (cosine >= T) and keep one per group; also drop near-copies of an eval set",
        "core.cli.curate:run_dedup",
        schema=CurateDedupCfg,
        description="Connected components of the items whose cosine similarity is at least --threshold, found "
        "blockwise (exact) or through an inverted file (ivf), never holding all pairs. Writes DIR/dedup.parquet "
        "(id, group, keep; leak with --against), a summary and report.html.",
        examples="example:\n  dinoscope curate dedup runs/pool --threshold 0.95 --against runs/eval --out runs/dedup",
    ),
    Command(
        "retrieve",
        "the k nearest pool items of every query of a seed set, as a manifest",
        "core.cli.curate:run_retrieve",
        schema=CurateRetrieveCfg,
        examples="example:\n  dinoscope curate retrieve runs/pool --queries runs/seed --k 4 --out retrieved.parquet",
    ),
    Command(
        "cluster",
        "hierarchical k-means (each level clusters the centroids of the level below)",
        "core.cli.curate:run_cluster",
        schema=CurateClusterCfg,
        examples="example:\n  dinoscope curate cluster runs/pool --subset runs/dedup/dedup.parquet "
        "--levels 1000,100,10 --out runs/clusters",
    ),
    Command(
        "sample",
        "a sample of N items balanced across the top-level clusters, then within each cluster",
        "core.cli.curate:run_sample",
        schema=CurateSampleCfg,
        examples="example:\n  dinoscope curate sample runs/pool --clusters runs/clusters --size 100000 "
        "--out curated.parquet\n  dinoscope pretrain recipe.yaml data.kind=manifest "
        "data.params.manifest=curated.parquet",
    ),
)
