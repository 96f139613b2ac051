"""Services behind ``dinoscope curate embed|dedup|retrieve|cluster|sample`` (data curation before pretraining).

    dinoscope curate embed photos/ --weights backbone.safetensors --out runs/pool
    dinoscope curate dedup runs/pool --threshold 0.95 --against runs/eval --out runs/dedup
    dinoscope curate retrieve runs/pool --queries runs/seed --k 4 --out runs/retrieved.parquet
    dinoscope curate cluster runs/pool --subset runs/dedup/dedup.parquet --levels 1000,100,10 --out runs/clusters
    dinoscope curate sample runs/pool --clusters runs/clusters --size 100000 --out runs/curated.parquet
    dinoscope pretrain recipe.yaml data.kind=manifest data.params.manifest=runs/curated.parquet

Each service turns its recipe into plain arguments for :mod:`core.curate`, prints the stage's summary as JSON and
returns 0. The stages follow Oquab et al. 2023 (DINOv2, section 3) and Vo et al. 2024 (hierarchical k-means).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from core.cli.adapter import Invocation
from core.config.curate import (
    CurateClusterCfg,
    CurateDedupCfg,
    CurateEmbedCfg,
    CurateRetrieveCfg,
    CurateSampleCfg,
)
from core.curate.balance import cluster_stage, sample_stage
from core.curate.collection import open_collection
from core.curate.embed import embed_collection
from core.curate.sources import source_specs
from core.curate.stages import dedup_stage, read_input, retrieve_stage
from core.errors import DinoscopeError


def _print(summary: dict[str, Any]) -> int:
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _require(value: str, field: str, what: str) -> None:
    if not value:
        raise DinoscopeError(f"no {what} was given", field=field, fix=f"pass --{field.replace('_', '-')}")


def _settings(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def run_embed(cfg: CurateEmbedCfg, options: None, invocation: Invocation) -> int:
    """Embed the SOURCEs into ``cfg.out`` (``embeddings.zarr`` + ``ids.parquet``)."""
    _require(cfg.weights, "weights", "backbone weights")
    paths = [str(Path(p).resolve()) for p in cfg.sources]
    summary = embed_collection(
        source_specs(cfg.kind, paths, dict(cfg.params)),
        cfg.out,
        weights=cfg.weights,
        size=cfg.size,
        batch_size=cfg.batch_size,
        chunk=cfg.chunk,
        avgpool=cfg.avgpool,
        dtype=cfg.dtype,
        device=cfg.device,
        num_workers=cfg.num_workers,
        resume=cfg.resume,
        overwrite=cfg.overwrite,
    )
    return _print(summary)


def run_dedup(cfg: CurateDedupCfg, options: None, invocation: Invocation) -> int:
    """Near-duplicate groups of INPUT, one kept per group (``cfg.out/dedup.parquet``)."""
    _require(cfg.input, "input", "INPUT")
    data = read_input(cfg.input, subset=cfg.subset, normalize=cfg.normalize, device=cfg.device)
    against = None
    if cfg.against:
        against = read_input(cfg.against, normalize=cfg.normalize, device=cfg.device, field="against")
    summary = dedup_stage(
        data,
        cfg.out,
        threshold=cfg.threshold,
        against=against,
        thumbnails=cfg.thumbnails,
        settings=_settings(cfg),
        method=cfg.method,
        exact_max=cfg.exact_max,
        lists=cfg.lists,
        probes=cfg.probes,
        seed=cfg.seed,
        block=cfg.block,
    )
    return _print(summary)


def run_retrieve(cfg: CurateRetrieveCfg, options: None, invocation: Invocation) -> int:
    """The ``k`` nearest INPUT items of every query, as a manifest."""
    _require(cfg.input, "input", "INPUT")
    _require(cfg.queries, "queries", "query set")
    pool = read_input(cfg.input, subset=cfg.subset, normalize=cfg.normalize, device=cfg.device)
    queries = read_input(cfg.queries, normalize=cfg.normalize, device=cfg.device, field="queries")
    summary = retrieve_stage(
        pool, queries, cfg.out, k=cfg.k, min_similarity=cfg.min_similarity, block=cfg.block, settings=_settings(cfg)
    )
    return _print(summary)


def run_cluster(cfg: CurateClusterCfg, options: None, invocation: Invocation) -> int:
    """Hierarchical k-means of INPUT (``cfg.out/clusters.parquet``, ``centroids.npz``)."""
    _require(cfg.input, "input", "INPUT")
    data = read_input(cfg.input, subset=cfg.subset, normalize=cfg.normalize, device=cfg.device)
    summary = cluster_stage(
        data,
        cfg.out,
        levels=cfg.levels,
        iters=cfg.iters,
        max_points_per_centroid=cfg.max_points_per_centroid,
        seed=cfg.seed,
        block=cfg.block,
        thumbnails=cfg.thumbnails,
        grid_clusters=cfg.grid_clusters,
        settings=_settings(cfg),
    )
    return _print(summary)


def run_sample(cfg: CurateSampleCfg, options: None, invocation: Invocation) -> int:
    """A sample of ``cfg.size`` items balanced over the clusters of ``cfg.clusters``, as a manifest."""
    _require(cfg.input, "input", "INPUT")
    _require(cfg.clusters, "clusters", "`curate cluster` output")
    summary = sample_stage(
        open_collection(cfg.input),
        cfg.clusters,
        cfg.out,
        size=cfg.size,
        strategy=cfg.strategy,
        seed=cfg.seed,
        subset=cfg.subset,
        report=cfg.report,
        thumbnails=cfg.thumbnails,
        grid_clusters=cfg.grid_clusters,
        settings=_settings(cfg),
    )
    return _print(summary)
