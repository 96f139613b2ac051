"""Cluster-balanced sampling down a hierarchical k-means (Vo et al. 2024, "Automatic data curation for
self-supervised learning: a clustering-based approach", hierarchical sampling).

The requested size is split as equally as possible across the top-level clusters; each cluster's quota is split
the same way across its children one level down, and so on to the finest clusters, where items are drawn at random
(or those closest to the centroid). A cluster smaller than its share gives all its items and its unused quota goes
to the others (water-filling, :func:`allocate`), so the sample always holds exactly the requested number of items
when the pool has that many. A concept that fills 90% of the pool thus gets about ``1 / k_top`` of the sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.config.curate import SAMPLE_STRATEGIES
from core.errors import DinoscopeError


def allocate(sizes: Sequence[int] | np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` across groups of ``sizes`` items as equally as possible, never above a group's size.

    Groups are served from the smallest up, each taking ``min(size, remaining // groups left)``, so the largest
    groups absorb both the quota that small groups cannot use and the units left by integer division; any unit
    still left goes to the groups with the most room (ties: lower index). The result sums to ``total`` exactly.

    Raises:
        ValueError: ``total`` is negative or larger than ``sum(sizes)``.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if total < 0 or total > int(sizes.sum()):
        raise ValueError(f"cannot take {total} items from groups holding {int(sizes.sum())}")
    quota = np.zeros(len(sizes), dtype=np.int64)
    remaining = int(total)
    order = np.argsort(sizes, kind="stable")
    for position, group in enumerate(order):
        give = min(int(sizes[group]), remaining // (len(order) - position))
        quota[group] = give
        remaining -= give
    if remaining:
        room = sizes - quota
        takers = np.lexsort((np.arange(len(sizes)), -room))[:remaining]  # most room first, then lower index
        quota[takers] += 1
    return quota


def balanced_sample(
    labels: np.ndarray,
    size: int,
    *,
    seed: int = 0,
    strategy: str = "random",
    distances: np.ndarray | None = None,
) -> np.ndarray:
    """Rows of a balanced sample of ``size`` items (sorted).

    Args:
        labels: ``[n, L]`` cluster of every item at every level, finest first (:class:`core.curate.kmeans.Hierarchy`).
        size: items to sample, at most ``n``.
        seed: seed of the random draws.
        strategy: ``random`` items of each finest cluster, or the ``closest`` to its centroid (needs ``distances``).
        distances: ``[n]`` distance of every item to its finest centroid (``closest`` only).
    """
    n, n_levels = labels.shape
    if size > n:
        raise DinoscopeError(
            f"a sample of {size} was asked for, but the pool holds {n} items",
            field="size",
            fix=f"ask for at most {n} items",
        )
    if strategy not in SAMPLE_STRATEGIES:
        raise DinoscopeError(f"unknown strategy {strategy!r}", field="strategy", fix=f"use one of {SAMPLE_STRATEGIES}")
    if strategy == "closest" and distances is None:
        raise ValueError("strategy 'closest' needs the distances to the finest centroids")
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    # Depth-first over (rows of one cluster, level below which to split, quota).
    stack = [(np.arange(n), n_levels - 1, size)]
    while stack:
        rows, level, quota = stack.pop()
        if quota == 0:
            continue
        if level < 0:  # within a finest cluster
            if strategy == "random":
                chosen.append(rng.choice(rows, quota, replace=False))
            else:
                chosen.append(rows[np.argsort(distances[rows], kind="stable")[:quota]])
            continue
        order = np.argsort(labels[rows, level], kind="stable")
        rows = rows[order]
        _, starts, counts = np.unique(labels[rows, level], return_index=True, return_counts=True)
        for start, count, share in zip(starts, counts, allocate(counts, quota), strict=True):
            stack.append((rows[start : start + count], level - 1, int(share)))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def shares(labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """The fraction of items in each of ``n_clusters`` clusters (``labels``: one cluster per item)."""
    counts = np.bincount(labels, minlength=n_clusters).astype(np.float64)
    return counts / max(1.0, counts.sum())
