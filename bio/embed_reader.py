"""The reading side of ``dinoscope cells embed`` (:mod:`bio.embed`): everything a field needs before the model.

:func:`prepare_field` reads a field's pixels, finds its nuclei, cuts every cell's crop in one gather
(:func:`bio.cells.crop_cells`) and measures the crops for quality control (:mod:`bio.qc`), so the model side only
batches crops and the field's pixels never leave the reader. The crops are cut once, for QC and the model alike.

:func:`start_reading` runs it ahead of the model, in worker *processes* where it can: reading a zarr field and QC
are mostly Python and small numpy calls that hold the GIL, so reader threads took turns with each other, the model and
the writer on one core (on 2 cores the whole pipeline ran at half the speed of reading alone). Workers are forked
(cheap: the loaded modules and the run's settings, nuclei table included, come with the fork and are never pickled),
each before the caller starts any thread of its own, and send back only the crops and per-cell values. Fields of
LoadData manifests (opened by stepping through the manifest) and platforms without ``fork`` use threads instead. The
reading starts before the run's inputs are checked and its model is loaded (the readers write nothing), so those
overlap the first fields; how far ahead the readers go is bounded by the bytes of crops waiting
(:class:`Reading`), so memory stays flat however large the plate.

Each model batch holds the crops of the centroids ``[k * batch_size, (k + 1) * batch_size)`` of one field that the
edge policy kept (:attr:`PreparedField.batches`), as when crops were cut batch by batch, so a field's embeddings
do not depend on its neighbours and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import pickle
import signal
import threading
from collections import deque
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np

from bio.cells import crop_cells
from bio.fields import CentroidFinder, FieldInfo, open_field_image, open_fields
from bio.preprocess import apply_illumination
from bio.qc import measure_cells, saturation_levels

_MAX_AUTO_WORKERS = 4
READ_AHEAD_BYTES = 32 * 2**20  # crops read ahead of the model, at most about (beyond a few fields)


@dataclass(frozen=True)
class ReadPlan:
    """What the readers do to every field of a run (the same for all fields)."""

    finder: CentroidFinder
    names: list[str]
    crop_size: int
    edge: str
    nuclear: int | None  # index of the nuclear stain in ``names`` for the QC nucleus area
    batch_size: int
    flats: dict[str, np.ndarray] | None = None


@dataclass
class PreparedField:
    """One field ready for the model: the crops ``[n, C, S, S]`` of the cells it keeps, their centroids ``[n, 2]``,
    ids, border flags and QC measurements (:func:`bio.qc.measure_cells`), the first crop of each model batch
    (``batches``), and how many nuclei were found (before ``edge="skip"`` dropped any)."""

    field: FieldInfo
    crops: np.ndarray
    cents: np.ndarray
    ids: np.ndarray
    at_edge: np.ndarray
    measured: dict[str, np.ndarray]
    batches: np.ndarray
    found: int


def prepare_field(plan: ReadPlan, field: FieldInfo, image: Any) -> PreparedField:
    """Read, find the nuclei, crop and measure one field; ``image`` is its open image or a function opening it."""
    if callable(image):
        image = image()
    with image:
        data = np.asarray(image.select(plan.names).read())
        if plan.flats is not None:
            for c, name in enumerate(plan.names):
                if name in plan.flats:
                    data[c] = apply_illumination(data[c], plan.flats[name]).astype(data.dtype)
        cents, ids = plan.finder.find(field, image, data, plan.names)
    cut = crop_cells(data, cents, plan.crop_size, edge=plan.edge)
    levels = saturation_levels(data) if len(cents) else np.full(len(data), np.inf)
    del data  # the crops are all the model needs
    # measured a batch at a time, which bounds the float32 temporaries of QC
    parts = [
        measure_cells(cut.crops[start : start + plan.batch_size], levels, plan.nuclear)
        for start in range(0, len(cut.crops), plan.batch_size)
    ] or [measure_cells(cut.crops, levels, plan.nuclear)]
    measured = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    return PreparedField(
        field=field,
        crops=cut.crops,
        cents=cents[cut.kept],
        ids=ids[cut.kept],
        at_edge=cut.at_edge,
        measured=measured,
        batches=np.searchsorted(cut.kept, np.arange(0, len(cents), plan.batch_size)),
        found=len(cents),
    )


def auto_workers(local_world_size: int = 1) -> int:
    """Reader processes per rank when none are asked for: one per CPU this process may use, shared by the ranks of
    the node, at most 4. The model's own process mostly waits (for its device, or for the readers), so it gets none."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(_MAX_AUTO_WORKERS, cpus // max(1, local_world_size)))


class Reading:
    """Fields being prepared ahead of the model (see :func:`start_reading`); iterate it once, in field order.

    A feeder thread submits the fields to the pool as long as fewer than ``depth`` are in flight or waiting, so the
    readers keep going while the consumer is busy elsewhere (checking the inputs, loading the model). ``depth`` is at
    least ``min_depth`` and grows up to ``max_depth`` while the fields read so far are small: the crops waiting stay
    within about ``budget`` bytes, whatever the plate's size.
    """

    def __init__(
        self,
        pool: Executor | None,
        jobs: Iterator[tuple[Any, ...]],
        *,
        min_depth: int = 1,
        max_depth: int = 1,
        budget: int = 0,
        eager: bool = False,
    ) -> None:
        self._pool, self._jobs = pool, jobs
        self._min_depth, self._max_depth, self._budget = min_depth, max(min_depth, max_depth), budget
        self._pending: deque[Future] = deque()
        self._cond = threading.Condition()
        self._sizes: list[int] = []  # bytes of the crops of each field read so far (the last few)
        self._fed = self._closed = False
        self._feed_error: BaseException | None = None
        self._feeder: threading.Thread | None = None
        if eager:
            self._start_feeder()

    def _submit(self, job: tuple[Any, ...]) -> None:
        future = self._pool.submit(*job)
        future.add_done_callback(self._measure)
        self._pending.append(future)

    def _depth(self) -> int:
        if not self._sizes:
            return self._min_depth
        mean = sum(self._sizes) / len(self._sizes)
        return int(min(self._max_depth, max(self._min_depth, self._budget // max(mean, 1))))

    def _start_feeder(self) -> None:
        if self._feeder is None and self._pool is not None:
            # The first field is submitted here, in the caller's thread: a process pool forks its workers on its first
            # submit, and a fork must not happen while another thread of this process may hold a lock (an import, a
            # file's, logging's), or the child can wait for it forever. The caller starts the readers before it
            # starts any thread of its own (the input checks').
            job = next(self._jobs, None)
            if job is not None:
                with self._cond:
                    self._submit(job)
            self._feeder = threading.Thread(target=self._feed, name="dinoscope-read-feeder", daemon=True)
            self._feeder.start()

    def _feed(self) -> None:
        try:
            for job in self._jobs:
                with self._cond:
                    self._cond.wait_for(lambda: self._closed or len(self._pending) < self._depth())
                    if self._closed:
                        return
                    self._submit(job)
                    self._cond.notify_all()
        except BaseException as err:  # noqa: BLE001 - opening a manifest's row failed: raised after its predecessors
            self._feed_error = err
        with self._cond:
            self._fed = True
            self._cond.notify_all()

    def _measure(self, future: Future) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        with self._cond:
            self._sizes = [*self._sizes[-15:], future.result().crops.nbytes]
            self._cond.notify_all()

    def __iter__(self) -> Iterator[PreparedField]:
        if self._pool is None:  # no read-ahead: each field is prepared when the model asks for it
            for function, *args in self._jobs:
                yield function(*args)
            return
        self._start_feeder()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._fed)
                if not self._pending:
                    break
                future = self._pending.popleft()
                self._cond.notify_all()
            try:
                prepared = future.result()
            except BrokenProcessPool as err:
                raise RuntimeError(
                    "a reader process of this run died (killed, or out of memory?); run the same command to resume"
                ) from err
            yield prepared
        if self._feed_error is not None:
            raise self._feed_error

    def close(self) -> None:
        """Stop reading. Fields not started are dropped and those being read are not waited for: whichever thread
        closes this (an error, SIGTERM) must never block on a read; forked workers exit after their current field."""
        with self._cond:
            self._closed = True
            pending, self._pending = bool(self._pending), deque()
            self._cond.notify_all()
        if self._pool is not None:
            self._pool.shutdown(wait=not pending, cancel_futures=True)


def start_reading(
    plan: ReadPlan,
    fields: Sequence[FieldInfo],
    wanted: Collection[int],
    *,
    prefetch: bool = True,
    workers: int = 1,
    processes: bool = True,
) -> Reading:
    """Prepare the ``wanted`` fields (by index) in field order, up to two per worker ahead of the consumer: in
    ``workers`` forked processes when ``processes`` and every field has a path (plate fields, TIFF files), else in
    threads; without ``prefetch``, each one when the consumer asks for it."""
    workers = max(1, workers)
    if all(field.path is not None for field in fields):
        mine = [field for field in fields if field.index in wanted]
        if prefetch and processes and "fork" in multiprocessing.get_all_start_methods():
            pool: Executor = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_start_worker,
                initargs=(plan,),
            )
            jobs = ((_prepare_in_worker, field) for field in mine)
            return Reading(
                pool, jobs, min_depth=2 * workers, max_depth=16 * workers, budget=READ_AHEAD_BYTES, eager=True
            )
        jobs: Iterator[tuple[Any, ...]] = (
            (prepare_field, plan, field, functools.partial(open_field_image, field)) for field in mine
        )
    else:  # LoadData rows are opened stepping through their manifest, here, and read in threads
        jobs = ((prepare_field, plan, field, image) for field, image in open_fields(fields, set(wanted)))
    if not prefetch:
        return Reading(None, jobs)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dinoscope-read")
    # a manifest's rows are opened here, in the caller's thread, so they wait until it asks (after the input checks,
    # whose messages are clearer than the opener's)
    return Reading(
        pool,
        jobs,
        min_depth=workers + 1,
        max_depth=16 * workers,
        budget=READ_AHEAD_BYTES,
        eager=all(field.path is not None for field in fields),
    )


_WORKER_PLAN: ReadPlan | None = None


def _start_worker(plan: ReadPlan) -> None:
    """In a forked reader: keep the plan; leave Ctrl-C (sent to the whole process group) to the parent, which stops
    the readers itself, and die quietly on SIGTERM (a scheduler signals every process of a job)."""
    global _WORKER_PLAN
    _WORKER_PLAN = plan
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _prepare_in_worker(field: FieldInfo) -> PreparedField:
    assert _WORKER_PLAN is not None, "a reader process runs _start_worker first"
    try:
        return prepare_field(_WORKER_PLAN, field, lambda: open_field_image(field))
    except Exception as err:
        try:  # the parent receives the exception pickled: one that cannot be is sent as its text
            pickle.dumps(err)
        except Exception:  # noqa: BLE001 - any pickling failure
            raise RuntimeError(f"reading field {field.key} failed: {type(err).__name__}: {err}") from None
        raise
