"""The model side of ``dinoscope cells embed`` (:mod:`bio.embed`): the crops that reader processes prepared
(:mod:`bio.embed_reader`: pixels read, nuclei found, crops cut and measured for quality control) are embedded batch by
batch (:func:`embed_field`), while a writer thread stores the fields already embedded (:class:`BackgroundWriter`).
The model thus never waits for reading, cropping or writing, as long as they keep up with it.

Every batch holds crops of one field only, so a field's embeddings do not depend on its neighbours and a resumed
run equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bio.backbone import CellBackbone
from bio.embed_reader import PreparedField
from bio.heads import predict_proba


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
    backbone: CellBackbone, prepared: PreparedField, names: list[str], classifier: Any, dtype: str
) -> FieldResult:
    """Embed the crops of one field (:func:`bio.embed_reader.prepare_field`) batch by batch.

    Args:
        backbone: the frozen encoder (:class:`bio.backbone.CellBackbone`).
        prepared: the field's crops, channels in the order of ``names``, with their cells' values and batches.
        classifier: a phenotype head from :func:`bio.heads.load_head`, or None; adds probabilities ``[n, K]``.
        dtype: storage dtype of the embeddings (``float32`` or ``float16``).

    Returns:
        the kept cells with embeddings ``[n, D]``; a field without cells gives zero rows of the right width.
    """
    n = len(prepared.crops)
    embeddings = np.zeros((n, backbone.embedding_dim(len(names))), dtype)
    probabilities = None if classifier is None else np.zeros((n, classifier.head.linear.out_features), np.float32)
    bounds = [*prepared.batches.tolist(), n]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        if stop == start:  # every crop of this batch crossed the border under edge="skip"
            continue
        emb = backbone.embed(prepared.crops[start:stop], names)
        embeddings[start:stop] = emb
        if classifier is not None:
            probabilities[start:stop] = predict_proba(classifier, emb)
    return FieldResult(
        embeddings,
        prepared.ids.astype(np.int64, copy=False),
        prepared.cents[:, 0],
        prepared.cents[:, 1],
        prepared.at_edge,
        **prepared.measured,
        probabilities=probabilities,
    )
