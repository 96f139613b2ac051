"""Curation algorithms on a synthetic collection with planted near-duplicates and a planted imbalance (one concept
holding 90% of the items): deduplication, blockwise search, union-find, quota allocation, hierarchical k-means and
balanced sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.curate import search
from core.curate.collection import normalized
from core.curate.dedup import DisjointSets, deduplicate
from core.curate.kmeans import hierarchical_kmeans, kmeans
from core.curate.sampling import allocate, balanced_sample
from core.curate.search import threshold_pairs, topk
from core.errors import DinoscopeError

CPU = torch.device("cpu")
THRESHOLD = 0.97


def planted(n: int = 2000, d: int = 128, concepts: int = 10, dominant: float = 0.9, bases: int = 150, seed: int = 0):
    """``(vectors, concept, origin)``: ``n`` distinct items in ``concepts`` tight blobs, the first holding
    ``dominant`` of them, plus 1-3 near-copies of ``bases`` random items appended (``origin`` = the copied item)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(concepts, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    counts = np.full(concepts, round(n * (1 - dominant) / (concepts - 1)))
    counts[0] = n - counts[1:].sum()
    concept = np.repeat(np.arange(concepts), counts)
    distinct = 2.5 * centres[concept] + rng.normal(size=(n, d)) / np.sqrt(d)
    copied = np.repeat(rng.choice(n, bases, replace=False), rng.integers(1, 4, bases))
    copies = distinct[copied] + 0.01 * rng.normal(size=(len(copied), d))
    vectors = np.concatenate([distinct, copies]).astype(np.float32)
    return vectors, np.concatenate([concept, concept[copied]]), np.concatenate([np.arange(n), copied])


@pytest.fixture(scope="module")
def collection() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    vectors, concept, origin = planted()
    return normalized(vectors), concept, origin


@pytest.mark.parametrize("method", ["exact", "ivf"])
def test_dedup_groups_the_planted_duplicates_without_false_merges(collection, method: str) -> None:
    X, _, origin = collection
    result = deduplicate(X, THRESHOLD, method=method, block=256, probes=4, device=CPU)
    assert result.method == method
    copies = np.flatnonzero(origin != np.arange(len(origin)))
    grouped = result.group[copies] == result.group[origin[copies]]
    assert grouped.mean() >= 0.99 and len(copies) > 200
    origins_per_group = [len(set(origin[result.group == g])) for g in np.unique(result.group)]
    assert max(origins_per_group) == 1  # no two distinct items ever share a group
    assert np.bincount(result.group, weights=result.keep).tolist() == [1.0] * (result.group.max() + 1)
    counts = result.counts()
    assert counts["kept"] == len(np.unique(origin)) and counts["removed_duplicates"] == len(copies)


def test_dedup_against_an_eval_set_removes_its_near_copies(collection) -> None:
    X, _, origin = collection
    rng = np.random.default_rng(1)
    leaked = rng.choice(2000, 20, replace=False)
    evaluation = normalized(X[leaked] + 0.001 * rng.normal(size=(20, X.shape[1])).astype(np.float32))
    result = deduplicate(X, THRESHOLD, against=evaluation, method="exact", block=512, device=CPU)
    expected = np.isin(origin, leaked)  # the leaked items and all their copies
    assert np.array_equal(result.leak, expected)
    assert not result.keep[expected].any()
    assert result.counts()["removed_near_eval"] == int(expected.sum())
    kept_groups = np.unique(result.group[result.keep])
    assert len(kept_groups) == len(np.unique(origin)) - 20


def _pairs(tiles) -> set[tuple[int, int]]:
    return {(int(a), int(b)) for i, j, _ in tiles for a, b in zip(i, j, strict=True)}


def test_blockwise_threshold_pairs_equal_the_dense_answer_in_small_tiles(monkeypatch) -> None:
    rng = np.random.default_rng(2)
    X = normalized(rng.normal(size=(150, 4)).astype(np.float32))
    tiles: list[int] = []
    rows = search.DeviceArray.rows
    monkeypatch.setattr(search.DeviceArray, "rows", lambda self, a, b: tiles.append(b - a) or rows(self, a, b))
    found = _pairs(threshold_pairs(X, 0.9, block=32, device=CPU))
    dense = X @ X.T
    expected = {(a, b) for a, b in zip(*np.nonzero(dense >= 0.9), strict=True) if a < b}
    assert found == expected and len(expected) > 100
    assert max(tiles) <= 32 and len(tiles) >= 15  # only 32-row tiles were ever multiplied
    Y = X[:10] + 0.0
    cross = _pairs(threshold_pairs(X, 0.9, Y=Y, block=32, device=CPU))
    assert cross == {(int(a), int(b)) for a, b in zip(*np.nonzero(X @ Y.T >= 0.9), strict=True)}


def test_topk_matches_a_full_sort_across_block_boundaries() -> None:
    rng = np.random.default_rng(3)
    X = normalized(rng.normal(size=(300, 16)).astype(np.float32))
    Q = normalized(rng.normal(size=(7, 16)).astype(np.float32))
    sims, rows = topk(Q, X, 5, block=64, device=CPU)
    dense = Q @ X.T
    assert np.array_equal(rows, np.argsort(-dense, axis=1)[:, :5])
    np.testing.assert_allclose(sims, np.take_along_axis(dense, rows, 1), rtol=1e-5)


def test_union_find_merges_long_chains_and_stars_to_their_smallest_member() -> None:
    sets = DisjointSets(1000)
    chain = np.arange(499)
    sets.union(chain[::-1] + 1, chain[::-1])  # 0-1-2-...-499, given back to front
    star = np.arange(501, 1000)
    sets.union(np.full(len(star) - 1, 999), star[:-1])  # every item of 501..998 linked to 999
    roots = sets.roots()
    assert (roots[:500] == 0).all() and roots[500] == 500 and (roots[501:] == 501).all()


def test_quota_redistribution_gives_exactly_the_requested_number() -> None:
    assert allocate([1, 2, 100], 50).tolist() == [1, 2, 47]
    assert allocate([5, 5, 5], 7).tolist() == [2, 2, 3]
    assert allocate([3, 0, 9], 12).tolist() == [3, 0, 9]
    rng = np.random.default_rng(4)
    for _ in range(200):
        sizes = rng.integers(0, 50, rng.integers(1, 20))
        total = int(rng.integers(0, sizes.sum() + 1))
        quota = allocate(sizes, total)
        assert quota.sum() == total and (quota <= sizes).all() and (quota >= 0).all()
        open_groups = quota < sizes  # groups not exhausted get equal shares (within one item)
        if open_groups.any():
            assert quota[open_groups].max() - quota[open_groups].min() <= 1
            assert quota[open_groups].min() >= quota.max() - 1
    with pytest.raises(ValueError):
        allocate([2, 3], 6)


def test_hierarchical_kmeans_levels_nest_and_find_the_planted_concepts(collection) -> None:
    X, concept, _ = collection
    hierarchy = hierarchical_kmeans(X, [50, 10], iters=15, seed=0, device=CPU)
    assert hierarchy.levels == [50, 10] and hierarchy.labels.shape == (len(X), 2)
    assert np.array_equal(hierarchy.labels[:, 1], hierarchy.parents[0][hierarchy.labels[:, 0]])
    top = hierarchy.labels[:, 1]
    purity = sum(np.bincount(concept[top == c]).max() for c in range(10)) / len(X)
    dominant = np.unique(top[concept == 0])
    assert purity > 0.98 and len(dominant) <= 2  # top-level clusters are concepts, not density
    assert (concept[np.isin(top, dominant)] == 0).all()
    with pytest.raises(DinoscopeError, match="shrink"):
        hierarchical_kmeans(X, [10, 50], device=CPU)
    with pytest.raises(DinoscopeError, match="clusters of"):
        kmeans(X[:5], 6, device=CPU)


def test_kmeans_reseeds_empty_clusters() -> None:
    X = np.repeat(np.eye(3, dtype=np.float32), [50, 1, 1], axis=0)  # 3 distinct points, 5 clusters asked for
    result = kmeans(X, 3, iters=5, device=CPU)
    assert sorted(np.bincount(result.labels, minlength=3).tolist()) == [1, 1, 50]


def test_balanced_sample_brings_the_dominant_concept_well_under_half(collection) -> None:
    X, concept, _ = collection
    kept = deduplicate(X, THRESHOLD, method="exact", block=512, device=CPU).keep
    rows = np.flatnonzero(kept)
    assert (concept[rows] == 0).mean() > 0.89
    hierarchy = hierarchical_kmeans(X[rows], [50, 10], iters=15, seed=0, device=CPU)
    sample = balanced_sample(hierarchy.labels, 150, seed=0)
    assert len(sample) == 150 and len(np.unique(sample)) == 150
    assert (concept[rows[sample]] == 0).mean() <= 0.25  # from 90% of the pool
    larger = balanced_sample(hierarchy.labels, 500, seed=0)  # small concepts run out: their quota moves on
    assert len(larger) == 500 and (concept[rows[larger]] == 0).mean() < 0.65
    with pytest.raises(DinoscopeError, match="at most"):
        balanced_sample(hierarchy.labels, len(rows) + 1)


def test_closest_strategy_takes_the_items_nearest_their_centroid() -> None:
    labels = np.array([[0, 0]] * 4 + [[1, 1]] * 4)
    distances = np.array([4.0, 1.0, 3.0, 2.0, 0.5, 0.1, 0.9, 0.7])
    assert balanced_sample(labels, 4, strategy="closest", distances=distances).tolist() == [1, 3, 4, 5]
    assert len(balanced_sample(labels, 8, strategy="random", seed=1)) == 8


def test_faiss_and_torch_search_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    if search.faiss is None:
        pytest.skip("faiss-cpu is not installed (extra [curate]); the torch path is the only one")
    rng = np.random.default_rng(3)
    X = rng.standard_normal((700, 32), dtype=np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    with_faiss = (search.topk(X[:50], X, 5, block=64), search.nearest(X, X[:20], k=2, block=64))
    monkeypatch.setattr(search, "faiss", None)
    with_torch = (search.topk(X[:50], X, 5, block=64), search.nearest(X, X[:20], k=2, block=64))
    for (a_vals, a_rows), (b_vals, b_rows) in zip(with_faiss, with_torch, strict=True):
        np.testing.assert_array_equal(a_rows, b_rows)
        np.testing.assert_allclose(a_vals, b_vals, atol=1e-4)
