"""The balancing stages end to end (Vo et al. 2024, "Automatic data curation for self-supervised learning: a
clustering-based approach"): a hierarchical k-means of the ``INPUT`` (``clusters.parquet``, ``centroids.npz``), then
a sample balanced across its top level and down the levels (a manifest), each with a summary and a report showing
cluster sizes before and after and thumbnails per cluster.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.curate.collection import Collection, blocks, rows_of_ids
from core.curate.kmeans import Hierarchy, hierarchical_kmeans
from core.curate.report import cluster_size_plot, thumbnail_grid, write_report
from core.curate.sampling import balanced_sample
from core.curate.sources import CollectionImages
from core.curate.stages import StageInput, check_parquet, report_dir
from core.data.manifest import read_manifest, write_manifest
from core.errors import DinoscopeError
from core.io import atomic_path, write_json
from core.lock import OutputLock


def level_column(level: int) -> str:
    """The ``clusters.parquet`` column of level ``level`` (1 = finest)."""
    return f"level_{level}"


def finest_distances(X: np.ndarray, hierarchy: Hierarchy, block: int = 65536) -> np.ndarray:
    """Squared distance of every item to its finest centroid."""
    centroids, labels = hierarchy.centroids[0], hierarchy.labels[:, 0]
    out = np.empty(len(X), np.float32)
    for start, stop in blocks(len(X), block):
        out[start:stop] = ((X[start:stop] - centroids[labels[start:stop]]) ** 2).sum(1)
    return out


def cluster_stage(
    data: StageInput,
    out: str | os.PathLike,
    *,
    levels: Sequence[int],
    iters: int = 20,
    max_points_per_centroid: int = 256,
    seed: int = 0,
    block: int = 16384,
    thumbnails: int = 8,
    grid_clusters: int = 16,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Hierarchical k-means of ``data`` into ``out`` (see the module docstring); returns the summary."""
    out = Path(out)
    with OutputLock(out, "curation output", is_dir=True):
        started = time.perf_counter()
        hierarchy = hierarchical_kmeans(
            data.vectors,
            levels,
            iters=iters,
            seed=seed,
            max_points_per_centroid=max_points_per_centroid,
            device=data.device,
            block=block,
        )
        seconds = time.perf_counter() - started
        distance = finest_distances(data.vectors, hierarchy)
        collection = data.collection
        columns = {
            **collection.manifest_columns(),
            **{level_column(i + 1): hierarchy.labels[:, i] for i in range(len(levels))},
            "distance": distance,
        }
        sizes = [np.bincount(hierarchy.labels[:, i], minlength=k) for i, k in enumerate(hierarchy.levels)]
        counts = {"items": len(collection), **{f"clusters at level {i + 1}": k for i, k in enumerate(levels)}}
        for i, level_sizes in enumerate(sizes):
            counts[f"largest share at level {i + 1}"] = round(float(level_sizes.max() / len(collection)), 4)
            counts[f"empty clusters at level {i + 1}"] = int((level_sizes == 0).sum())
        info = {"stage": "cluster", "levels": list(levels), **counts}
        write_manifest(out / "clusters.parquet", columns, sources=collection.sources, info=info)
        arrays = {f"centroids_{i + 1}": c for i, c in enumerate(hierarchy.centroids)}
        arrays.update({f"parents_{i + 1}": p for i, p in enumerate(hierarchy.parents)})
        with atomic_path(out / "centroids.npz") as tmp, tmp.open("wb") as handle:
            np.savez(handle, **arrays)
        summary = {**info, "seconds": round(seconds, 3), "input": collection.where, "settings": dict(settings or {})}
        write_json(out / "cluster_summary.json", summary)
        series = {f"level {i + 1} (k={k})": s for i, (k, s) in enumerate(zip(levels, sizes, strict=True))}
        top = len(levels) - 1
        images = CollectionImages(collection.sources, collection.columns)
        grid = (
            _top_cluster_rows(data.vectors, hierarchy, sizes[top], grid_clusters, thumbnails)
            if images.available
            else []
        )
        figures = [
            (
                "items per cluster at every level",
                cluster_size_plot(out / "cluster_sizes.png", series, title="hierarchical k-means", unit="items"),
            ),
            (
                "items closest to the largest top-level clusters",
                thumbnail_grid(out / "clusters.png", images, grid, title=f"top level (k={levels[-1]})"),
            ),
        ]
        table = [
            (c, int(sizes[top][c]), round(float(sizes[top][c] / len(collection)), 4)) for c in _largest(sizes[top])
        ]
        tables = [("top-level clusters", ["cluster", "items", "share"], table[:50])]
        write_report(
            out, title="Clustering", counts=counts, figures=figures, settings=summary["settings"], tables=tables
        )
    return summary


def _largest(sizes: np.ndarray) -> list[int]:
    return [int(c) for c in np.argsort(-sizes, kind="stable") if sizes[c] > 0]


def _top_cluster_rows(
    X: np.ndarray, hierarchy: Hierarchy, top_sizes: np.ndarray, n_clusters: int, per_cluster: int
) -> list[tuple[str, np.ndarray]]:
    """For the largest top-level clusters, the member rows closest to the cluster's centroid."""
    labels, centroids = hierarchy.labels[:, -1], hierarchy.centroids[-1]
    rows = []
    for c in _largest(top_sizes)[:n_clusters]:
        members = np.flatnonzero(labels == c)
        distance = np.concatenate(
            [((X[members[a:b]] - centroids[c]) ** 2).sum(1) for a, b in blocks(len(members), 65536)]
        )
        closest = members[np.argsort(distance, kind="stable")[:per_cluster]]
        rows.append((f"cluster {c}\n({top_sizes[c]} items)", closest))
    return rows


def sample_stage(
    collection: Collection,
    clusters: str | os.PathLike,
    out: str | os.PathLike,
    *,
    size: int,
    strategy: str = "random",
    seed: int = 0,
    subset: str = "",
    report: str = "",
    thumbnails: int = 8,
    grid_clusters: int = 16,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A balanced sample of ``size`` items of the ``clusters`` output as the manifest ``out``; returns the summary."""
    out = check_parquet(out)
    if size < 1:
        raise DinoscopeError("no sample size was given", field="size", fix="pass --size N (N >= 1)")
    table = read_manifest(Path(clusters) / "clusters.parquet")
    names = sorted((c for c in table.columns if c.startswith("level_")), key=lambda c: int(c.split("_")[1]))
    if not names:
        raise DinoscopeError("not a `curate cluster` output", path=clusters, field="clusters")
    pool = np.ones(len(table), dtype=bool)
    if subset:
        pool = np.isin(table.ids, read_manifest(subset).kept().ids)
    labels = np.stack([table.columns[n][pool] for n in names], axis=1).astype(np.int64)
    rows_in_input = rows_of_ids(collection.ids, table.ids[pool], where=clusters)
    if size > len(labels):
        raise DinoscopeError(
            f"a sample of {size} was asked for, but the pool holds {len(labels)} items",
            field="size",
            fix=f"ask for at most {len(labels)} items",
        )
    reports = report_dir(out, report)
    with OutputLock(out, "manifest", is_dir=False):
        chosen = balanced_sample(labels, size, seed=seed, strategy=strategy, distances=table.columns["distance"][pool])
        columns = {
            **collection.manifest_columns(rows_in_input[chosen]),
            **{name: labels[chosen, i] for i, name in enumerate(names)},
        }
        top = labels[:, -1]
        n_top = int(top.max()) + 1
        before, after = np.bincount(top, minlength=n_top), np.bincount(top[chosen], minlength=n_top)
        counts = {
            "pool": int(pool.sum()),
            "sample": len(chosen),
            "top-level clusters": int((before > 0).sum()),
            "largest top-level share in the pool": round(float(before.max() / before.sum()), 4),
            "largest top-level share in the sample": round(float(after.max() / max(1, after.sum())), 4),
            "share in the sample of the pool's largest top-level cluster": round(
                float(after[before.argmax()] / max(1, after.sum())), 4
            ),
            "removed": int(pool.sum()) - len(chosen),
        }
        info = {"stage": "sample", "size": size, "strategy": strategy, **counts}
        write_manifest(out, columns, sources=collection.sources, info=info)
        summary = {**info, "manifest": str(out), "settings": dict(settings or {})}
        write_json(reports / "sample_summary.json", summary)
        finest = labels[:, 0]
        n_fine = int(finest.max()) + 1
        images = CollectionImages(collection.sources, collection.columns)
        grid = [
            (f"cluster {c}\n({before[c]} -> {after[c]})", rows_in_input[chosen[top[chosen] == c]][:thumbnails])
            for c in _largest(before)[:grid_clusters]
        ]
        figures = [
            (
                "top-level cluster sizes, pool and sample",
                cluster_size_plot(
                    reports / "top_level_sizes.png", {"pool": before, "sample": after}, title="top level", unit="items"
                ),
            ),
            (
                "finest cluster sizes, pool and sample",
                cluster_size_plot(
                    reports / "finest_sizes.png",
                    {
                        "pool": np.bincount(finest, minlength=n_fine),
                        "sample": np.bincount(finest[chosen], minlength=n_fine),
                    },
                    title="finest level",
                    unit="items",
                ),
            ),
            (
                "sampled items of the largest top-level clusters (pool -> sample)",
                thumbnail_grid(reports / "sample.png", images, grid, title="sample"),
            ),
        ]
        table_rows = [(c, int(before[c]), int(after[c])) for c in _largest(before)[:50]]
        write_report(
            reports,
            title="Balanced sample",
            counts=counts,
            figures=figures,
            settings=summary["settings"],
            tables=[("top-level clusters", ["cluster", "pool", "sample"], table_rows)],
        )
    return summary
