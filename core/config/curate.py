"""Schemas of ``dinoscope curate embed|dedup|retrieve|cluster|sample``: data curation before pretraining.

The stages follow DINOv2's curation of LVD-142M (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features
without Supervision", section 3): embed an uncurated pool, remove near-duplicates (also of evaluation sets), retrieve
neighbours of a curated seed set; and the balanced sampling of Vo et al. 2024 ("Automatic data curation for
self-supervised learning: a clustering-based approach"): hierarchical k-means, then a sample balanced across the top
level and, within each cluster, down the levels.

Every ``INPUT`` is a ``curate embed`` run directory or a plain ``N x D`` ``.npy`` float array (row indices are ids).
Schemas only: the services are in :mod:`core.cli.curate`.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config.fields import option

EMBED_DTYPES = ("float32", "float16")
DEDUP_METHODS = ("auto", "exact", "ivf")
SAMPLE_STRATEGIES = ("random", "closest")


@dataclass
class CurateEmbedCfg:
    """``dinoscope curate embed SOURCE... --weights W --out RUN``: embed a collection, resumably, over ranks."""

    sources: list[str] = option(
        [],
        help="image folders, GeoTIFFs or plates: each is the path argument of the dataset kind (none for a kind "
        "that reads no files)",
        positional=True,
        metavar="SOURCE",
        is_input=True,
    )
    kind: str = option("image_folder", help="dataset kind of the sources: image_folder, geotiff, cells or any kind")
    params: dict = option({}, help="other keyword arguments of the dataset kind, e.g. window_size=64 length=5000")
    weights: str = option("", help="backbone weights (any checkpoint `weights inspect` reads)", is_input=True)
    out: str = option("runs/curate_embed", help="run directory (embeddings.zarr + ids.parquet)")
    size: int = option(0, help="input side in pixels, a multiple of the patch size (0: the backbone's)", minimum=0)
    batch_size: int = option(64, help="images per forward pass", minimum=1)
    chunk: int = option(1024, help="items per committed chunk (the unit of resume and of rank sharding)", minimum=1)
    avgpool: bool = option(False, help="append the mean patch token to the class token")
    dtype: str = option("float32", help="storage type of the embeddings", choices=EMBED_DTYPES)
    device: str = option("auto", help="auto, cpu, cuda or cuda:N")
    num_workers: int = option(0, help="DataLoader worker processes reading the images", minimum=0)
    resume: bool = option(True, help="continue a previous run in --out (--no-resume starts over)")
    overwrite: bool = option(False, help="replace a run in --out that was made with other settings")


@dataclass
class CurateInputCfg:
    """What every stage after ``embed`` reads: the embeddings, an optional subset, and where to compute."""

    input: str = option(
        "",
        help="a `curate embed` run directory or an N x D .npy array",
        positional=True,
        metavar="INPUT",
        is_input=True,
    )
    subset: str = option(
        "", help="use only the ids of this manifest (its keep=true rows when it has a keep column)", is_input=True
    )
    normalize: bool = option(True, help="L2-normalise the embeddings (cosine geometry)")
    device: str = option("auto", help="where similarities are computed: auto, cpu, cuda or cuda:N")
    block: int = option(4096, help="rows per block of the chunked similarity computation", minimum=16)


@dataclass
class CurateDedupCfg(CurateInputCfg):
    """``dinoscope curate dedup INPUT --threshold T --out DIR``: near-duplicate groups, one item kept per group."""

    threshold: float = option(
        0.95, help="cosine similarity at or above which two items are duplicates", above=-1.0, maximum=1.0
    )
    out: str = option("runs/curate_dedup", help="output directory (dedup.parquet, summary, report)")
    against: str = option(
        "", help="evaluation set (run directory or .npy): pool items as similar to any of it are removed", is_input=True
    )
    method: str = option(
        "auto", help="exact (blockwise all pairs), ivf (coarse clusters probed) or auto", choices=DEDUP_METHODS
    )
    exact_max: int = option(50_000, help="auto: exact search up to this many items, ivf above", minimum=1)
    lists: int = option(0, help="ivf: coarse clusters (0: about 2 sqrt(N))", minimum=0)
    probes: int = option(8, help="ivf: nearest coarse clusters searched for each item", minimum=1)
    seed: int = option(0, help="seed of the ivf coarse clustering")
    thumbnails: int = option(8, help="duplicate groups shown in the report (image inputs)", minimum=0)


@dataclass
class CurateRetrieveCfg(CurateInputCfg):
    """``dinoscope curate retrieve INPUT --queries Q --k K --out M.parquet``: nearest pool items of a seed set."""

    queries: str = option("", help="the seed set: a `curate embed` run directory or a .npy array", is_input=True)
    k: int = option(4, help="neighbours retrieved per query", minimum=1)
    min_similarity: float = option(-1.0, help="drop neighbours less similar than this", minimum=-1.0, maximum=1.0)
    out: str = option("curated.parquet", help="output manifest (.parquet)")


@dataclass
class CurateClusterCfg(CurateInputCfg):
    """``dinoscope curate cluster INPUT --levels a,b,c --out DIR``: hierarchical k-means (Vo et al. 2024)."""

    levels: list[int] = option(
        [1000, 100, 10], help="clusters per level, finest first, comma-separated", comma_list=True, minimum=1
    )
    iters: int = option(20, help="Lloyd iterations per level", minimum=1)
    max_points_per_centroid: int = option(
        256, help="k-means trains on at most this many items per cluster (seeded subsample)", minimum=1
    )
    seed: int = option(0, help="seed of the initialisation and subsampling")
    out: str = option("runs/curate_cluster", help="output directory (clusters.parquet, centroids.npz, report)")
    thumbnails: int = option(8, help="examples per cluster in the thumbnail grid (image inputs)", minimum=0)
    grid_clusters: int = option(16, help="top-level clusters shown in the thumbnail grid", minimum=1)


@dataclass
class CurateSampleCfg(CurateInputCfg):
    """``dinoscope curate sample INPUT --clusters DIR --size N --out M.parquet``: a cluster-balanced sample."""

    clusters: str = option("", help="a `curate cluster` output directory", is_input=True)
    size: int = option(0, help="items to sample (required)", minimum=0)
    strategy: str = option(
        "random",
        help="within the finest clusters: random items, or those closest to the centroid",
        choices=SAMPLE_STRATEGIES,
    )
    seed: int = option(0, help="seed of the sample")
    out: str = option("curated.parquet", help="output manifest (.parquet)")
    report: str = option("", help="report directory (default: <out without .parquet>_report)")
    thumbnails: int = option(8, help="examples per cluster in the thumbnail grid (image inputs)", minimum=0)
    grid_clusters: int = option(16, help="top-level clusters shown in the thumbnail grid", minimum=1)
