"""The per-field cell pipeline of ``dinoscope cells embed`` (:mod:`bio.embed`): open and read a field's pixels,
find its nuclei and measure each cell's crop for quality control (focus, saturation, nucleus area; :mod:`bio.qc`) a
few fields ahead in worker threads (:func:`read_ahead`), then crop boxes around the centroids and embed them batch by
batch (:func:`embed_field`), while a writer thread stores the fields already embedded (:class:`BackgroundWriter`).
The model thus never waits for reading, cropping or writing, as long as they keep up with it.

Every batch holds crops of one field only, so a field's embeddings do not depend on its neighbours and a resumed
run equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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
    workers: int = 2,
) -> Iterator[tuple[FieldInfo, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray] | None]]:
    """Read pixels, find centroids and (with ``measure(data, centroids)``) measure the cells' QC of each field, in
    ``workers`` threads up to ``workers`` fields ahead when ``prefetch``; yields ``(field, pixels, centroids, ids,
    measurements)`` in field order. ``opened`` gives each field with its image, or with a function opening it (then
    opened in the worker too)."""

    def load(item: tuple[FieldInfo, Any]) -> tuple[FieldInfo, np.ndarray, np.ndarray, np.ndarray, Any]:
        field, image = item
        if callable(image):
            image = image()
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
    workers = max(1, workers)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dinoscope-read")
    pending: deque[Future] = deque()
    try:
        for item in opened:
            pending.append(pool.submit(load, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # Stopped early (an error, SIGTERM) the fields not started are dropped and those being read are not waited
        # for: whichever thread closes this generator (the garbage collector may run in any) must never block on a
        # read that needs that thread.
        pool.shutdown(wait=not pending, cancel_futures=True)


_STOP = object()


class BackgroundWriter:
    """Calls ``write(item)`` for each item :meth:`put`, in order, in a daemon thread, with at most ``depth`` items
    waiting, so that storing one field overlaps embedding the next.

    The first error of ``write`` is raised in the caller by its next :meth:`put` or by :meth:`close`, and nothing
    after it is written. :meth:`abandon` (the caller stopped: an error, SIGTERM) returns at once: the item being
    written finishes or is cut short with the process, which the part store's atomic rows files and commit lines
    make safe (a field is only ever committed after its rows), and nothing queued is written.
    """

    def __init__(self, write: Callable[[Any], None], depth: int = 2) -> None:
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="dinoscope-embed-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._error is None and not self._stopped:
                try:
                    self._write(item)
                except BaseException as err:  # noqa: BLE001 - handed to the caller, which raises it
                    self._error = err

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, item: Any) -> None:
        """Queue ``item`` (waits while ``depth`` items wait); raises the writer's error, if any."""
        self._raise()
        self._queue.put(item)

    def close(self) -> None:
        """Wait until everything queued is written; raises the writer's error, if any."""
        self._queue.put(_STOP)
        self._thread.join()
        self._raise()

    def abandon(self) -> None:
        """Stop without waiting: nothing queued is written any more."""
        self._stopped = True
        with contextlib.suppress(queue.Full):  # when full, the thread drops the queued items after this write
            self._queue.put_nowait(_STOP)


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
