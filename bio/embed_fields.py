"""The per-field cell pipeline of ``dinoscope cells embed`` (:mod:`bio.embed`): read a field's pixels, find its
nuclei and measure each cell's crop for quality control (focus, saturation, nucleus area; :mod:`bio.qc`), one field
ahead in a worker thread, then crop boxes around the centroids and embed them batch by batch.

Every batch holds crops of one field only, so a field's embeddings do not depend on its neighbours and a resumed
run equals an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from bio.backbone import CellBackbone
from bio.cells import crop_cells
from bio.fields import CentroidFinder, FieldInfo
from bio.heads import predict_proba
from bio.preprocess import apply_illumination
from bio.qc import measure_field

COLUMNS = ("cell_id", "y", "x", "edge", "focus", "saturated_fraction", "nucleus_area")


@dataclass
class FieldResult:
    """One field's cells: embeddings ``[n, D]``, ids, centroids, edge flags, QC measurements (focus ``[n, C]``,
    saturated fraction and nucleus area ``[n]``) and optional class probabilities."""

    embeddings: np.ndarray
    cell_id: np.ndarray
    y: np.ndarray
    x: np.ndarray
    edge: np.ndarray
    focus: np.ndarray
    saturated_fraction: np.ndarray
    nucleus_area: np.ndarray
    probabilities: np.ndarray | None = None


def read_ahead(
    opened: Iterator[tuple[FieldInfo, Any]],
    finder: CentroidFinder,
    names: list[str],
    flats: dict[str, np.ndarray] | None,
    prefetch: bool,
    measure: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]] | None = None,
) -> Iterator[tuple[FieldInfo, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray] | None]]:
    """Read pixels, find centroids and (with ``measure(data, centroids)``) measure the cells' QC of each field, one
    field ahead in a worker thread when ``prefetch``; yields ``(field, pixels, centroids, ids, measurements)``."""

    def load(item: tuple[FieldInfo, Any]) -> tuple[FieldInfo, np.ndarray, np.ndarray, np.ndarray, Any]:
        field, image = item
        with image:
            data = np.asarray(image.select(names).read())
            if flats is not None:
                for c, name in enumerate(names):
                    if name in flats:
                        data[c] = apply_illumination(data[c], flats[name]).astype(data.dtype)
            cents, ids = finder.find(field, image, data, names)
        return field, data, cents, ids, measure(data, cents) if measure else None

    if not prefetch:
        yield from map(load, opened)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for item in opened:
            future = pool.submit(load, item)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()


def embed_field(
    backbone: CellBackbone,
    data: np.ndarray,
    cents: np.ndarray,
    ids: np.ndarray,
    names: list[str],
    crop_size: int,
    edge: str,
    classifier: Any,
    dtype: str,
    nuclear: int | None = None,
    measured: dict[str, np.ndarray] | None = None,
) -> FieldResult:
    """Embed the cells of one field in batches of ``backbone.batch_size`` crops.

    Args:
        backbone: the frozen encoder (:class:`bio.backbone.CellBackbone`).
        data: the field's pixels ``[C, Y, X]``, channels in the order of ``names``.
        cents: nucleus centroids ``[n, 2]`` as ``(y, x)`` pixels; ids: their cell ids ``[n]``.
        crop_size, edge: box side in pixels and the border policy of :func:`bio.cells.crop_cells`.
        classifier: a phenotype head from :func:`bio.heads.load_head`, or None; adds probabilities ``[n, K]``.
        dtype: storage dtype of the embeddings (``float32`` or ``float16``).
        nuclear: index of the nuclear stain in ``names`` for the QC nucleus area, or None.
        measured: the field's QC measurements from :func:`bio.qc.measure_field` (same crops), when already made;
            otherwise they are measured here.

    Returns:
        the kept cells (all, or those away from the border with ``edge="skip"``) with embeddings ``[n, D]``; a
        field without cells gives zero rows of the right width.
    """
    parts: list[FieldResult] = []
    if measured is None:
        measured = measure_field(data, cents, crop_size, edge, nuclear, backbone.batch_size)
    done = 0
    for start in range(0, len(cents), backbone.batch_size):
        batch = crop_cells(data, cents[start : start + backbone.batch_size], crop_size, edge=edge)
        kept = start + batch.kept
        qc = {key: value[done : done + len(kept)] for key, value in measured.items()}
        done += len(kept)
        emb = backbone.embed(batch.crops, names)
        probs = None
        if classifier is not None:
            probs = predict_proba(classifier, emb)
        parts.append(
            FieldResult(
                emb.astype(dtype), ids[kept], cents[kept, 0], cents[kept, 1], batch.at_edge, **qc, probabilities=probs
            )
        )
    if not parts:  # a field without cells still gets committed, with zero rows
        probs = None if classifier is None else np.zeros((0, classifier.head.linear.out_features), np.float32)
        return FieldResult(
            np.zeros((0, backbone.embedding_dim(len(names))), dtype),
            np.zeros(0, np.int64),
            np.zeros(0),
            np.zeros(0),
            np.zeros(0, bool),
            np.zeros((0, len(names)), np.float32),
            np.zeros(0, np.float32),
            np.zeros(0, np.float32),
            probs,
        )
    joined = {name: np.concatenate([getattr(p, name) for p in parts]) for name in ("embeddings",) + COLUMNS}
    probs = None if classifier is None else np.concatenate([p.probabilities for p in parts])
    return FieldResult(**joined, probabilities=probs)
