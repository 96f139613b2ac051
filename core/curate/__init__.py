"""Data curation before pretraining: embed a huge unlabeled collection, remove near-duplicates (and near-copies of
evaluation sets), retrieve neighbours of a seed set, and rebalance it with a hierarchical k-means.

After DINOv2's automatic curation of LVD-142M (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without
Supervision", section 3) and the clustering-based balancing of Vo et al. 2024 ("Automatic data curation for
self-supervised learning: a clustering-based approach"). Every stage reads an ``INPUT`` (a ``curate embed`` run
directory or an ``N x D`` ``.npy``) and writes Parquet manifests (:mod:`core.data.manifest`) that ``dinoscope
pretrain`` reads as ``data.kind: manifest``.

Modules: :mod:`~core.curate.embed` and :mod:`~core.curate.store` (resumable, rank-parallel embedding),
:mod:`~core.curate.collection` (inputs), :mod:`~core.curate.search` (blockwise similarity, CPU or GPU),
:mod:`~core.curate.dedup`, :mod:`~core.curate.kmeans`, :mod:`~core.curate.sampling`, :mod:`~core.curate.stages`
and :mod:`~core.curate.balance` (the stages end to end), :mod:`~core.curate.report`, :mod:`~core.curate.sources`.
"""

from __future__ import annotations

from core.lazy import lazy_exports

_EXPORTS = {
    "Collection": "core.curate.collection",
    "open_collection": "core.curate.collection",
    "deduplicate": "core.curate.dedup",
    "embed_collection": "core.curate.embed",
    "hierarchical_kmeans": "core.curate.kmeans",
    "kmeans": "core.curate.kmeans",
    "allocate": "core.curate.sampling",
    "balanced_sample": "core.curate.sampling",
    "threshold_pairs": "core.curate.search",
    "topk": "core.curate.search",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports("core.curate", _EXPORTS)
