"""Near-duplicate removal: items whose cosine similarity is at least ``T`` are grouped as connected components, and
one item is kept per group; items as similar to an evaluation set are removed too, to prevent leakage.

This is the deduplication of DINOv2's curation (Oquab et al. 2023, section 3: copy detection on the pool and removal
of near-duplicates of the evaluation sets). Two searches find the pairs, neither holding all pairwise similarities:

* ``exact``: every pair, tile by tile (:func:`core.curate.search.threshold_pairs`), ``O(N^2 D)`` work;
* ``ivf``: an inverted file. A coarse k-means splits the items into ``lists``; each item is compared with the
  members of its ``probes`` nearest lists only, about ``N * probes * N / lists`` pairs instead of ``N^2 / 2``. A pair
  is found when either item's probed lists include the other's list, which near-duplicates (almost the same vector)
  nearly always satisfy. ``auto`` uses ``exact`` up to ``exact_max`` items.

Components are built with a union-find whose unions are vectorised (minimum-label hooking plus pointer jumping),
fed in batches of edges, so memory is one int64 per item plus one batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from core.curate.collection import blocks
from core.curate.kmeans import kmeans
from core.curate.search import DeviceArray, nearest, threshold_pairs

log = logging.getLogger(__name__)
_EDGE_BATCH = 2_000_000
_IVF_POINTS_PER_LIST = 64  # the coarse quantiser trains on a subsample: it only needs to split space evenly


class DisjointSets:
    """Union-find over ``0..n-1`` with vectorised unions; every root is the smallest index of its set."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: np.ndarray) -> np.ndarray:
        """The roots of the elements ``x``."""
        root = self.parent[x]
        while True:
            up = self.parent[root]
            if np.array_equal(up, root):
                return root
            root = up

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Merge the sets of ``a[i]`` and ``b[i]`` for every ``i``."""
        a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
        while len(a):
            ra, rb = self.find(a), self.find(b)
            differ = ra != rb
            a, b, ra, rb = a[differ], b[differ], ra[differ], rb[differ]
            # Hook the larger root under the smaller; conflicting hooks keep the minimum, the loop redoes the rest.
            np.minimum.at(self.parent, np.maximum(ra, rb), np.minimum(ra, rb))

    def roots(self) -> np.ndarray:
        """The root of every element (and full path compression)."""
        while True:
            up = self.parent[self.parent]
            if np.array_equal(up, self.parent):
                return self.parent
            self.parent = up


def components(n: int, pairs: Iterator[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, int]:
    """Connected components of the graph on ``n`` nodes with the edges ``pairs``: ``(root per node, edge count)``."""
    sets = DisjointSets(n)
    pending_a: list[np.ndarray] = []
    pending_b: list[np.ndarray] = []
    pending = edges = 0
    for a, b in pairs:
        pending_a.append(a)
        pending_b.append(b)
        pending += len(a)
        edges += len(a)
        if pending >= _EDGE_BATCH:
            sets.union(np.concatenate(pending_a), np.concatenate(pending_b))
            pending_a, pending_b, pending = [], [], 0
    if pending_a:
        sets.union(np.concatenate(pending_a), np.concatenate(pending_b))
    return sets.roots(), edges


def exact_pairs(
    X: np.ndarray, threshold: float, *, block: int, device: torch.device
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every pair ``i < j`` of rows of ``X`` with similarity ``>= threshold`` (all tiles)."""
    for a, b, _ in threshold_pairs(X, threshold, block=block, device=device):
        yield a, b


@torch.no_grad()
def ivf_pairs(
    X: np.ndarray,
    threshold: float,
    *,
    lists: int = 0,
    probes: int = 8,
    seed: int = 0,
    block: int = 4096,
    device: torch.device | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pairs with similarity ``>= threshold`` found through an inverted file (see the module docstring)."""
    device = device or torch.device("cpu")
    n = len(X)
    lists = min(n, lists or max(1, round(2 * math.sqrt(n))))
    probes = min(probes, lists)
    coarse = kmeans(X, lists, iters=10, seed=seed, max_points_per_centroid=_IVF_POINTS_PER_LIST, device=device)
    _, probe = nearest(X, coarse.centroids, k=probes, device=device)  # n x probes, nearest first
    members_order = np.argsort(probe[:, 0], kind="stable")
    members_start = np.searchsorted(probe[members_order, 0], np.arange(lists + 1))
    flat = probe.ravel()
    probers_order = np.argsort(flat, kind="stable")
    probers_start = np.searchsorted(flat[probers_order], np.arange(lists + 1))
    points = DeviceArray(X, device)
    for cell in range(lists):
        members = members_order[members_start[cell] : members_start[cell + 1]]
        if not len(members):
            continue
        probers = probers_order[probers_start[cell] : probers_start[cell + 1]] // probes
        for m_start, m_stop in blocks(len(members), block):  # a crowded list is still searched in tiles
            database = points.take(members[m_start:m_stop])
            for start, stop in blocks(len(probers), block):
                queries = probers[start:stop]
                i, j = (points.take(queries) @ database.T >= threshold).nonzero(as_tuple=True)
                a, b = queries[i.cpu().numpy()], members[m_start:m_stop][j.cpu().numpy()]
                distinct = a != b
                if distinct.any():
                    yield a[distinct], b[distinct]


def near_eval(X: np.ndarray, E: np.ndarray, threshold: float, *, block: int, device: torch.device) -> np.ndarray:
    """Whether each row of ``X`` has a row of ``E`` with similarity ``>= threshold`` (``[n]`` bool)."""
    hit = np.zeros(len(X), dtype=bool)
    for a, _, _ in threshold_pairs(X, threshold, Y=E, block=block, device=device):
        hit[a] = True
    return hit


@dataclass
class DedupResult:
    """Per item: its dense ``group`` number, whether it is kept, whether it was removed as near an evaluation item.

    Attributes:
        group, keep, leak: ``[n]`` arrays.
        pairs: duplicate pairs found (edges, counted once per tile that found them).
        method: ``exact`` or ``ivf``.
    """

    group: np.ndarray
    keep: np.ndarray
    leak: np.ndarray
    pairs: int
    method: str

    def counts(self) -> dict[str, int]:
        """Items, groups and what was removed, for summaries and reports."""
        sizes = np.bincount(self.group)
        return {
            "items": len(self.group),
            "groups": len(sizes),
            "duplicate_groups": int((sizes > 1).sum()),
            "largest_group": int(sizes.max()) if len(sizes) else 0,
            "duplicate_pairs": self.pairs,
            "removed_duplicates": int((~self.keep & ~self.leak).sum()),
            "removed_near_eval": int(self.leak.sum()),
            "kept": int(self.keep.sum()),
        }


def deduplicate(
    X: np.ndarray,
    threshold: float,
    *,
    against: np.ndarray | None = None,
    method: str = "auto",
    exact_max: int = 50_000,
    lists: int = 0,
    probes: int = 8,
    seed: int = 0,
    block: int = 4096,
    device: torch.device | None = None,
) -> DedupResult:
    """Group the rows of ``X`` (unit rows, float32) whose similarity is ``>= threshold``; keep one per group.

    The kept item of a group is its first row that is not near ``against`` (a group whose items are all near it
    keeps none).
    """
    device = device or torch.device("cpu")
    n = len(X)
    method = method if method != "auto" else ("exact" if n <= exact_max else "ivf")
    if method == "exact":
        pairs = exact_pairs(X, threshold, block=block, device=device)
    else:
        pairs = ivf_pairs(X, threshold, lists=lists, probes=probes, seed=seed, block=block, device=device)
    roots, edges = components(n, pairs)
    _, group = np.unique(roots, return_inverse=True)
    leak = near_eval(X, against, threshold, block=block, device=device) if against is not None else np.zeros(n, bool)
    candidates = np.flatnonzero(~leak)
    first = np.full(group.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(first, group[candidates], candidates)
    keep = np.zeros(n, dtype=bool)
    keep[first[first < n]] = True
    log.info("dedup (%s, T=%.3f): %d items -> %d kept", method, threshold, n, int(keep.sum()))
    return DedupResult(group.astype(np.int64), keep, leak, edges, method)
