"""The deduplication and retrieval stages end to end: read the ``INPUT``, search, write the manifest, the summary
and the report. The balancing stages are in :mod:`core.curate.balance`.

Both follow DINOv2's curation pipeline (Oquab et al. 2023, section 3): near-duplicates of the pool and of the
evaluation sets are removed, then the nearest pool items of a curated seed set are retrieved ("sample-based
retrieval": the ``k`` nearest neighbours of every query).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.curate.collection import Collection, load_vectors, open_collection, restrict
from core.curate.dedup import deduplicate
from core.curate.report import cluster_size_plot, similarity_histogram, thumbnail_grid, write_report
from core.curate.search import topk
from core.curate.sources import CollectionImages
from core.data.manifest import write_manifest
from core.distributed.device import resolve_device
from core.errors import DinoscopeError
from core.io import write_json
from core.lock import OutputLock

log = logging.getLogger(__name__)
_GROUP_MEMBERS_SHOWN = 8


@dataclass
class StageInput:
    """An ``INPUT`` ready for a stage: the collection (restricted to ``subset``) and its vectors as float32."""

    collection: Collection
    vectors: np.ndarray
    device: torch.device


def read_input(
    path: str | os.PathLike, *, subset: str = "", normalize: bool = True, device: str = "auto", field: str = "input"
) -> StageInput:
    """Open ``path`` (run directory or ``.npy``), keep the ids of the ``subset`` manifest, load the vectors."""
    collection = open_collection(path, field_name=field)
    if subset:
        collection, _ = restrict(collection, subset)
    if not len(collection):
        raise DinoscopeError("no item is left to curate", path=path, field="subset", fix="check the subset manifest")
    target = resolve_device(device, field="device")
    return StageInput(collection, load_vectors(collection, normalize=normalize), target)


def report_dir(out: str | os.PathLike, report: str = "") -> Path:
    """Where the report of a stage writing the manifest ``out`` goes: ``report``, or ``<out stem>_report``."""
    out = Path(out)
    return Path(report) if report else out.with_name(f"{out.stem}_report")


def check_parquet(out: str | os.PathLike) -> Path:
    """The manifest path ``out``, refused unless it ends in ``.parquet``."""
    out = Path(out)
    if out.suffix.lower() != ".parquet":
        raise DinoscopeError("a manifest is a .parquet file", path=out, field="out", fix="end --out with .parquet")
    return out


def dedup_stage(
    data: StageInput,
    out: str | os.PathLike,
    *,
    threshold: float,
    against: StageInput | None = None,
    thumbnails: int = 8,
    settings: Mapping[str, Any] | None = None,
    **search: Any,
) -> dict[str, Any]:
    """Deduplicate ``data`` into ``out/dedup.parquet`` (id, group, keep, and leak with ``against``), with
    ``dedup_summary.json`` and ``report.html``; ``search`` goes to :func:`core.curate.dedup.deduplicate`."""
    out = Path(out)
    if against is not None and against.vectors.shape[1] != data.vectors.shape[1]:
        raise DinoscopeError(
            f"the evaluation set has width {against.vectors.shape[1]}, the pool {data.vectors.shape[1]}",
            path=against.collection.where,
            field="against",
            fix="embed both with the same backbone",
        )
    with OutputLock(out, "curation output", is_dir=True):
        started = time.perf_counter()
        result = deduplicate(
            data.vectors,
            threshold,
            against=None if against is None else against.vectors,
            device=data.device,
            **search,
        )
        seconds = time.perf_counter() - started
        collection = data.collection
        columns = {**collection.manifest_columns(), "group": result.group, "keep": result.keep}
        if against is not None:
            columns["leak"] = result.leak
        counts = result.counts()
        info = {"stage": "dedup", "threshold": threshold, "method": result.method, **counts}
        write_manifest(out / "dedup.parquet", columns, sources=collection.sources, info=info)
        summary = {**info, "seconds": round(seconds, 3), "input": collection.where, "settings": dict(settings or {})}
        write_json(out / "dedup_summary.json", summary)
        sizes = np.bincount(result.group)
        figures = [
            (
                "near-duplicate group sizes (groups of 2 or more)",
                cluster_size_plot(
                    out / "group_sizes.png", {"groups": sizes[sizes > 1]}, title="near-duplicate groups", unit="items"
                )
                if (sizes > 1).any()
                else None,
            ),
            ("largest near-duplicate groups (kept item first)", _group_grid(out, collection, result, thumbnails)),
        ]
        write_report(out, title="Deduplication", counts=counts, figures=figures, settings=summary["settings"])
    return summary


def _group_grid(out: Path, collection: Collection, result: Any, n_groups: int) -> Path | None:
    sizes = np.bincount(result.group)
    largest = [int(g) for g in np.argsort(-sizes, kind="stable")[:n_groups] if sizes[g] > 1]
    if not largest:
        return None
    images = CollectionImages(collection.sources, collection.columns)
    groups = []
    for g in largest:
        rows = np.flatnonzero(result.group == g)
        rows = np.concatenate([rows[result.keep[rows]], rows[~result.keep[rows]]])[:_GROUP_MEMBERS_SHOWN]
        groups.append((f"group {g}\n({sizes[g]} items)", rows))
    return thumbnail_grid(out / "groups.png", images, groups, title="near-duplicate groups")


def retrieve_stage(
    pool: StageInput,
    queries: StageInput,
    out: str | os.PathLike,
    *,
    k: int,
    min_similarity: float = -1.0,
    block: int = 4096,
    report: str = "",
    thumbnails: int = 8,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``k`` nearest pool items of every query, as a manifest of unique pool items (with the query that
    retrieved each one most similarly, its rank for that query and the similarity), a summary and a report."""
    out = check_parquet(out)
    if queries.vectors.shape[1] != pool.vectors.shape[1]:
        raise DinoscopeError(
            f"the queries have width {queries.vectors.shape[1]}, the pool {pool.vectors.shape[1]}",
            path=queries.collection.where,
            field="queries",
            fix="embed both with the same backbone",
        )
    reports = report_dir(out, report)
    with OutputLock(out, "manifest", is_dir=False):
        started = time.perf_counter()
        sims, rows = topk(queries.vectors, pool.vectors, k, block=block, device=pool.device)
        seconds = time.perf_counter() - started
        query_of = np.repeat(np.arange(len(queries.vectors)), sims.shape[1])
        rank = np.tile(np.arange(sims.shape[1]), len(queries.vectors))
        flat_sims, flat_rows = sims.ravel(), rows.ravel()
        wanted = flat_sims >= min_similarity
        order = np.lexsort((flat_rows[wanted], -flat_sims[wanted]))  # most similar first
        chosen_rows = flat_rows[wanted][order]
        unique_rows, first = np.unique(chosen_rows, return_index=True)
        pick = np.flatnonzero(wanted)[order][first]
        collection = pool.collection
        columns = {
            **collection.manifest_columns(unique_rows),
            "query": queries.collection.ids[query_of[pick]],
            "rank": rank[pick],
            "similarity": flat_sims[pick].astype(np.float32),
        }
        counts = {
            "pool": len(collection),
            "queries": len(queries.collection),
            "k": int(sims.shape[1]),
            "retrieved": len(unique_rows),
            "below_min_similarity": int((~wanted).sum()),
            "retrieved_more_than_once": int(len(chosen_rows) - len(unique_rows)),
        }
        info = {"stage": "retrieve", **counts}
        write_manifest(out, columns, sources=collection.sources, info=info)
        summary = {**info, "seconds": round(seconds, 3), "manifest": str(out), "settings": dict(settings or {})}
        write_json(reports / "retrieve_summary.json", summary)
        images = CollectionImages(collection.sources, collection.columns)
        grid = [
            (f"query {queries.collection.ids[q]}", rows[q][sims[q] >= min_similarity]) for q in range(min(8, len(sims)))
        ]
        figures = [
            (
                "similarity of retrieved items",
                similarity_histogram(
                    reports / "similarities.png",
                    flat_sims,
                    title="query-neighbour similarity",
                    threshold=None if min_similarity <= -1 else min_similarity,
                ),
            ),
            (
                "nearest pool items of the first queries",
                thumbnail_grid(
                    reports / "neighbours.png", images, [(g, r[:thumbnails]) for g, r in grid], title="retrieved"
                ),
            ),
        ]
        write_report(reports, title="Retrieval", counts=counts, figures=figures, settings=summary["settings"])
    return summary
