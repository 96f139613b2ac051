"""k-means and the hierarchical k-means of Vo et al. 2024 ("Automatic data curation for self-supervised learning:
a clustering-based approach"): level 1 clusters the items, each further level clusters the centroids of the level
below, so the top level splits the data by concept rather than by density.

k-means is Lloyd's algorithm in torch (CPU or GPU), trained as Faiss does on a seeded subsample of at most
``max_points_per_centroid`` points per cluster and then used to assign every item in blocks; initialisation is
k-means++ (Arthur and Vassilvitskii 2007) on a subsample of 4 points per cluster (at least 4096); an empty cluster is
re-seeded with the point farthest from its centroid. Levels above the first cluster only centroids, so they keep the
best of 5 restarts (lowest inertia). Memory is the data plus ``block x k`` distances.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.curate.collection import blocks
from core.curate.search import DeviceArray, nearest
from core.errors import DinoscopeError

log = logging.getLogger(__name__)
_INIT_POINTS_PER_CENTROID = 4  # k-means++ is sequential (k passes over its sample): keep the sample small
_INIT_POINTS_MIN = 4096
_UPPER_LEVEL_RESTARTS = 5  # levels above the first cluster centroids only: restarts are cheap there


@dataclass
class KMeansResult:
    """Centroids ``[k, D]``, the cluster of every point ``[n]`` and the mean squared distance to it."""

    centroids: np.ndarray
    labels: np.ndarray
    inertia: float


@torch.no_grad()
def kmeans_pp(X: np.ndarray, k: int, rng: np.random.Generator, device: torch.device) -> np.ndarray:
    """k-means++ seeding: each next centre drawn with probability proportional to the squared distance."""
    points = torch.from_numpy(np.ascontiguousarray(X, np.float32)).to(device)
    sq = (points * points).sum(1)

    def distance_to(row: int) -> torch.Tensor:  # |p|^2 - 2 p.c + |c|^2: one matrix-vector product
        return (sq - 2.0 * (points @ points[row]) + sq[row]).clamp_min(0)

    chosen = [int(rng.integers(len(X)))]
    closest = distance_to(chosen[0])
    for _ in range(1, k):
        weights = closest.double().cpu().numpy()
        total = weights.sum()
        nxt = int(rng.choice(len(X), p=weights / total)) if total > 0 else int(rng.integers(len(X)))
        chosen.append(nxt)
        closest = torch.minimum(closest, distance_to(nxt))
    return X[np.asarray(chosen)].astype(np.float32)


@torch.no_grad()
def kmeans(
    X: np.ndarray,
    k: int,
    *,
    iters: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    device: torch.device | None = None,
    block: int = 16384,
    n_init: int = 1,
) -> KMeansResult:
    """Cluster the rows of ``X`` (float32 ``[n, D]``) into ``k`` clusters; see the module docstring.

    With ``n_init > 1`` the whole run is repeated from different seeds and the lowest inertia wins.
    """
    n = len(X)
    if not 1 <= k <= n:
        raise DinoscopeError(
            f"cannot make {k} clusters of {n} points", field="levels", fix=f"use at most {n} clusters at this level"
        )
    runs = [
        _lloyd(X, k, iters=iters, seed=seed + 1000 * i, mppc=max_points_per_centroid, device=device, block=block)
        for i in range(max(1, n_init))
    ]
    return min(runs, key=lambda run: run.inertia)


def _lloyd(
    X: np.ndarray, k: int, *, iters: int, seed: int, mppc: int, device: torch.device | None, block: int
) -> KMeansResult:
    device = device or torch.device("cpu")
    n = len(X)
    max_points_per_centroid = mppc
    rng = np.random.default_rng(seed)
    train_rows = np.arange(n)
    if n > k * max_points_per_centroid:
        train_rows = np.sort(rng.choice(n, k * max_points_per_centroid, replace=False))
    train = np.ascontiguousarray(X[train_rows], np.float32)
    init = train
    init_points = max(k * _INIT_POINTS_PER_CENTROID, _INIT_POINTS_MIN)
    if len(train) > init_points:
        init = train[np.sort(rng.choice(len(train), init_points, replace=False))]
    centroids = torch.from_numpy(kmeans_pp(init, k, rng, device)).to(device)
    points = DeviceArray(train, device)
    for iteration in range(iters):
        c_sq = (centroids * centroids).sum(1)
        sums = torch.zeros_like(centroids)
        counts = torch.zeros(k, dtype=torch.float32, device=device)
        far_dist, far_rows = torch.full((0,), -1.0, device=device), torch.zeros(0, dtype=torch.int64, device=device)
        for start, stop in blocks(len(points), block):
            x = points.rows(start, stop)
            d = torch.addmm(c_sq[None], x, centroids.T, alpha=-2.0)  # block x k, without |x|^2 (same per row)
            best, label = d.min(1)
            best = (best + (x * x).sum(1)).clamp_min(0)
            sums.index_add_(0, label, x)
            counts.index_add_(0, label, torch.ones_like(best))
            top = best.topk(min(k, len(best)))  # candidates to re-seed empty clusters: the worst-served points
            far_dist = torch.cat([far_dist, top.values])
            far_rows = torch.cat([far_rows, top.indices + start])
        empty = (counts == 0).nonzero(as_tuple=True)[0]
        new = sums / counts.clamp_min(1)[:, None]
        if len(empty):
            order = far_dist.argsort(descending=True)[: len(empty)]
            new[empty] = points.take(far_rows[order].cpu().numpy())
        shift = float(((new - centroids) ** 2).sum(1).max())
        centroids = new
        if shift < 1e-10 and not len(empty):
            log.debug("k-means (k=%d) converged after %d iterations", k, iteration + 1)
            break
    dist, labels = nearest(X, centroids.cpu().numpy(), block=block, device=device)
    return KMeansResult(centroids.cpu().numpy(), labels[:, 0], float(dist.mean()))


@dataclass
class Hierarchy:
    """A hierarchical k-means.

    Attributes:
        centroids: per level, finest first, ``[k_l, D]``.
        parents: per level but the top, the level-``l+1`` cluster of each level-``l`` cluster (``[k_l]``).
        labels: ``[n, L]``, the cluster of every item at every level (column 0 finest).
    """

    centroids: list[np.ndarray]
    parents: list[np.ndarray]
    labels: np.ndarray

    @property
    def levels(self) -> list[int]:
        """Clusters per level, finest first."""
        return [len(c) for c in self.centroids]


def hierarchical_kmeans(
    X: np.ndarray,
    levels: Sequence[int],
    *,
    iters: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    device: torch.device | None = None,
    block: int = 16384,
) -> Hierarchy:
    """k-means on the items with ``levels[0]`` clusters, then on the centroids with ``levels[1]``, and so on."""
    if list(levels) != sorted(levels, reverse=True) or len(set(levels)) != len(levels):
        raise DinoscopeError(
            f"levels {list(levels)} must shrink strictly from the finest to the top",
            field="levels",
            fix="give decreasing cluster counts, e.g. 1000,100,10",
        )
    centroids, parents = [], []
    points = X
    item_labels = np.zeros((len(X), len(levels)), np.int64)
    for depth, k in enumerate(levels):
        result = kmeans(
            points,
            k,
            iters=iters,
            seed=seed + depth,
            max_points_per_centroid=max_points_per_centroid,
            device=device,
            block=block,
            n_init=1 if depth == 0 else _UPPER_LEVEL_RESTARTS,
        )
        log.info("k-means level %d: %d clusters of %d points (inertia %.4g)", depth + 1, k, len(points), result.inertia)
        if depth == 0:
            item_labels[:, 0] = result.labels
        else:
            parents.append(result.labels)
            item_labels[:, depth] = result.labels[item_labels[:, depth - 1]]
        centroids.append(result.centroids)
        points = result.centroids
    return Hierarchy(centroids, parents, item_labels)
