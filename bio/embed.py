"""``dinoscope cells embed``: per-cell embeddings of whole screens, resumable and sharded over ranks.

    dinoscope cells embed plate1.ome.zarr plate2.ome.zarr --weights backbone.safetensors --out RUN
    dinoscope cells embed load_data.csv --centroids table --nuclei-table nuclei.csv --weights w.pth --out RUN
    dinoscope cells embed images/ --channels DNA,ER,RNA,AGP,Mito --weights w.pth --out RUN --format anndata
    torchrun --nproc_per_node=8 -m core.cli cells embed plates/*.ome.zarr --weights w.safetensors --out RUN

Output, the layout :mod:`bio.profiles` reads: ``RUN/embeddings.zarr`` (zarr v3 group; array ``embeddings``
``[n_cells, D]`` chunked by rows; channel names, normalisation, weights metadata in the group attributes) and
``RUN/cells.parquet`` (``plate, well, site, cell_id, x, y, edge``, the QC measurements and flags of :mod:`bio.qc`,
row i = embedding row i; with ``--head`` also ``predicted_<label>`` and ``prob_<class>``). With ``--format anndata``
also ``RUN/cells.h5ad`` (:mod:`bio.embed_anndata`). Sources are OME-Zarr plates, LoadData manifests and
multi-channel (OME-)TIFF files, folders and image lists (:mod:`bio.fields_files`).

Work is done field by field (DeepProfiler-style crops around nucleus centroids). Rank ``r`` of ``W`` takes fields
``r, r+W, ...``. Reader processes (:mod:`bio.embed_reader`, forked, ``read_workers`` of them) read each field, find
its nuclei, cut all its crops in one gather and measure them for QC, while this process only batches the crops
through the model (:mod:`bio.embed_fields`) and a writer thread stores each field's rows in the rank's own part
``RUN/parts/rank-<r>/``; a field is committed by one line in the part's ``committed.jsonl`` written only after its
rows, so a field interrupted by a crash is simply redone on resume and no cell is stored twice. Every batch holds
crops of one field only, so a field's embeddings do not depend on its neighbours and a resumed run equals an
uninterrupted one. When every field is committed, rank 0 merges the parts in field order into the final store
(atomic renames; :mod:`bio.embed_merge`) and removes them. Memory: the crops read ahead (a few fields, at most about
32 MiB beyond those; :class:`bio.embed_reader.Reading`), two fields waiting for the writer thread, one batch of
crops, and a focus score and nucleus area per embedded cell for the merge's QC medians.

Before any of this, :mod:`bio.embed_checks` checks every input (metadata only, nothing written); the run directory
is locked for the whole run, and a previous run there is resumed, found complete, or refused when its settings differ
(replaced with ``overwrite``): see :mod:`bio.embed_store`. A run that embeds no cell at all fails, saying why, and
leaves no state behind that would block or be resumed by the corrected command. The readers start before the checks
and the model load (they write nothing), so those overlap the first fields instead of adding to the run's time.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from bio.backbone import CellBackbone
from bio.embed_anndata import ANNDATA_FILE, require_anndata, write_anndata
from bio.embed_checks import check_inputs, nothing_embedded
from bio.embed_fields import BackgroundWriter, FieldResult, embed_field
from bio.embed_merge import merge_parts
from bio.embed_reader import Reading, ReadPlan, auto_workers, start_reading
from bio.embed_store import PartWriter, all_commits, discard_attempt, run_lock, start_run, wait_for_all
from bio.fields import CentroidFinder, FieldInfo, field_channel_names, list_fields
from bio.fields_files import DEFAULT_NAME_PATTERN
from bio.heads import check_compatible, load_head
from bio.io import channel_indices
from bio.preprocess import load_illumination
from bio.qc import QcThresholds
from core.distributed.device import resolve_device
from core.distributed.env import DistEnv
from core.errors import DinoscopeError
from core.io import write_json
from core.logging import JsonlLogger, progress

log = logging.getLogger(__name__)

EDGE_POLICIES = ("pad", "skip")
DTYPES = ("float32", "float16")
FORMATS = ("zarr", "anndata")


def embed_plate(
    sources: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    weights: str | os.PathLike,
    channels: Sequence[str] | None = None,
    weights_channels: Sequence[str] | None = None,
    centroids: str = "detect",
    nuclei_table: str | os.PathLike | None = None,
    label_channel: str | None = None,
    detect_channel: str = "DNA",
    crop_size: int = 64,
    edge: str = "pad",
    batch_size: int = 256,
    normalisation: str = "auto",
    n_last_blocks: int = 1,
    avgpool: bool = False,
    input_size: int | None = None,
    dtype: str = "float32",
    chunk_rows: int = 0,
    head: str | os.PathLike | None = None,
    illumination: str | os.PathLike | None = None,
    device: str = "auto",
    precision: str = "fp32",
    resume: bool = True,
    overwrite: bool = False,
    prefetch: bool = True,
    read_workers: int = 0,
    poll_seconds: float = 1.0,
    channel_map: Mapping[str, str] | None = None,
    name_pattern: str = DEFAULT_NAME_PATTERN,
    qc: QcThresholds | None = None,
    output_format: str = "zarr",
) -> dict[str, Any]:
    """Embed every cell of OME-Zarr plates and/or LoadData manifests into ``out_dir`` (see the module docstring).

    Args:
        sources: plate roots (``.zarr``), LoadData CSVs, (OME-)TIFF files, folders of them and image-list CSVs;
            fields are numbered in this order.
        weights: backbone file for :meth:`bio.backbone.CellBackbone.load`.
        channels: data channels to embed, in this order (default: every channel except ``label_channel``).
        weights_channels: names of a fixed-channel model's inputs when its file carries none.
        centroids: ``detect`` (watershed on ``detect_channel``), ``table`` (CellProfiler ``nuclei_table``) or
            ``labels`` (instance masks: a channel named ``label_channel``, or NGFF ``labels/<label_channel>``).
        crop_size, edge: box side in pixels; boxes crossing the field border are zero-padded (``pad``, flagged
            ``edge``) or dropped (``skip``).
        normalisation, n_last_blocks, avgpool, input_size, batch_size, device, precision: see
            :class:`~bio.backbone.CellBackbone`.
        dtype: ``float32`` or ``float16`` storage. chunk_rows: rows per zarr chunk (default about 8 MiB).
        head: a phenotype head from ``dinoscope cells fit-head``; adds per-cell predictions.
        illumination: ``.npz`` flat-fields per channel (:func:`bio.preprocess.save_illumination`).
        resume: continue a previous run in ``out_dir`` (settings must match); ``False`` starts over.
        overwrite: replace a run in ``out_dir`` made with other settings (otherwise refused).
        prefetch, read_workers: read, find nuclei, crop and measure the next fields in ``read_workers`` forked
            processes (threads for LoadData manifests; 0: one per CPU of the rank, at most 4) while the current one is
            embedded; without ``prefetch`` all in this thread, one field at a time (embedded fields are always stored
            by a writer thread).
        poll_seconds: how often rank 0 checks whether the other ranks are done.
        channel_map: renames the sources' channels (``{"OrigDNA": "DNA"}``); manifests also follow the ``Orig``
            rule of :mod:`bio.io_manifest`.
        name_pattern: how TIFF file names give plate, well and site (:mod:`bio.fields_files`).
        qc: thresholds of the per-cell QC flags (:class:`bio.qc.QcThresholds`; default thresholds when None).
        output_format: ``zarr`` (always written), or ``anndata`` to also write ``RUN/cells.h5ad``.

    Returns:
        the run summary (also written to ``RUN/embed_summary.json``).

    Example::

        import pandas as pd
        from bio import embed_plate, open_run

        embed_plate(["plate1.ome.zarr"], "runs/embed", weights="backbone.safetensors", channels=["DNA", "RNA", "ER"])
        run = open_run("runs/embed")
        cells = pd.read_parquet(run.cells_path)   # one row per cell: plate, well, site, cell_id, x, y, edge
        vectors = run.embeddings[:]                # (n_cells, D) float32
    """
    env = DistEnv.from_environ()
    run = Path(out_dir)
    for key, value, valid in (
        ("edge", edge, EDGE_POLICIES),
        ("dtype", dtype, DTYPES),
        ("format", output_format, FORMATS),
    ):
        if value not in valid:
            raise DinoscopeError(f"unknown {key} {value!r}", field=key, fix=f"use one of {', '.join(valid)}")
    if crop_size < 1:
        raise DinoscopeError(f"crop size must be positive, got {crop_size}", field="crop_size")
    if batch_size < 1:
        raise DinoscopeError(f"batch_size must be positive, got {batch_size}", field="batch_size")
    if output_format == "anndata":
        require_anndata()
    qc = qc or QcThresholds()
    # Held for the whole run. A single process on an existing directory locks first, so that a second run there
    # fails at once; otherwise the inputs are checked first (a failed check leaves no new directory behind) and
    # start_run locks, with every rank agreeing (bio.embed_store).
    lock = run_lock(run, env.rank)
    if env.world_size == 1 and run.exists():
        lock.acquire()
    reading: Reading | None = None
    try:
        fields = list_fields(sources, channel_map=channel_map, name_pattern=name_pattern)
        finder = CentroidFinder(
            centroids, nuclei_table=nuclei_table, label_channel=label_channel, detect_channel=detect_channel
        )
        names = _embedding_channels(fields, channels, label_channel)
        flats = load_illumination(illumination) if illumination else None
        plan = ReadPlan(
            finder,
            names,
            crop_size,
            edge,
            names.index(finder.detect_channel) if finder.detect_channel in names else None,
            batch_size,
            flats,
        )
        ours = [f.index for f in fields if f.index % env.world_size == env.rank]
        workers = read_workers or auto_workers(env.local_world_size)

        def read(wanted: list[int]) -> Reading:
            return start_reading(plan, fields, wanted, prefetch=prefetch, workers=workers)

        # The readers start now, before the inputs are checked and the model is loaded (they write nothing, and are
        # forked before the model reaches any device), so those overlap the first fields. Which fields are still to
        # do is a guess until start_run has settled the directory; a wrong guess is read again below.
        guess = _not_committed(run, ours) if resume else ours
        reading = read(guess)
        check_inputs(fields, finder, names)
        device = str(resolve_device(device, local_rank=env.local_rank, field="model.device"))
        backbone = CellBackbone.load(
            weights,
            weights_channels=weights_channels,
            normalisation=normalisation,
            n_last_blocks=n_last_blocks,
            avgpool=avgpool,
            input_size=input_size,
            batch_size=batch_size,
            device=device,
            precision=precision,
        )
        description = backbone.describe(names)
        classifier = head_meta = None
        if head:
            classifier, head_meta = load_head(head)
            check_compatible(head_meta, description, head)
        settings = {
            "sources": [str(Path(s).resolve()) for s in sources],
            "channels": names,
            "centroids": finder.describe(),
            "crops": {"size": crop_size, "edge": edge},
            "illumination": str(illumination) if illumination else None,
            "dtype": dtype,
            "precision": backbone.precision,
            "normalisation": description["normalisation"],
            "features": description["features"],
            "weights": backbone.weights_sha256 or str(weights),
            "head": head_meta["sha256"] if head_meta else None,
            "n_fields": len(fields),
            "channel_map": dict(sorted((channel_map or {}).items())),
            "name_pattern": name_pattern,
            "qc": qc.describe(),
        }
        if start_run(run, settings, env, lock, resume=resume, overwrite=overwrite):
            return _already_complete(run, env, output_format)
        part = PartWriter(run / "parts" / f"rank-{env.rank:04d}")
        done = set(all_commits(run))
        if done and env.is_main:
            log.info("resuming %s: %d of %d fields were embedded before", run, len(done), len(fields))
        mine = [index for index in ours if index not in done]
        if mine != guess:
            reading.close()
            reading = read(mine)
        logger = JsonlLogger(run / "embed_log.jsonl")
        started = time.perf_counter()

        def store(item: tuple[FieldInfo, FieldResult, float, int]) -> None:
            """In the writer thread: the field's rows and commit line, then its log line."""
            field, result, seconds, found = item
            t0 = time.perf_counter()
            part.append(field, result, seconds, found=found)
            seconds += time.perf_counter() - t0
            n = len(result.cell_id)
            logger.log(
                rank=env.rank, field=field.index, key=field.key, n_cells=n, seconds=seconds, cells_per_s=n / seconds
            )

        def embed_fields(prepared_fields: Reading) -> Iterator[None]:
            """One tick per embedded cell, so the shared progress bar shows cells/s."""
            writer = BackgroundWriter(store, depth=2 if prefetch else 1)
            try:
                for prepared in prepared_fields:
                    t0 = time.perf_counter()
                    result = embed_field(backbone, prepared, names, classifier, dtype)
                    writer.put((prepared.field, result, max(time.perf_counter() - t0, 1e-9), prepared.found))
                    yield from itertools.repeat(None, len(result.cell_id))
            except BaseException:
                writer.abandon()
                raise
            finally:
                prepared_fields.close()  # here, in this thread, not by the garbage collector in some other one
            writer.close()

        for _ in progress(embed_fields(reading), desc=f"embed (rank {env.rank}/{env.world_size})", unit="cell"):
            pass
        if not env.is_main:
            return {"rank": env.rank, "fields": len(mine), "rows": part.rows}
        commits = wait_for_all(run, len(fields), poll_seconds, env.world_size)
        if not sum(record["n"] for _, record in commits.values()):
            error = nothing_embedded(run, [record for _, record in commits.values()], finder, crop_size, edge)
            discard_attempt(run)
            raise error
        attrs = {
            **description,
            "crops": settings["crops"],
            "centroids": settings["centroids"],
            "sources": settings["sources"],
            "illumination": settings["illumination"],
            "dtype": dtype,
            "head": {k: head_meta[k] for k in ("label", "classes", "sha256", "path")} if head_meta else None,
            "format": "dinoscope.cells.embed/1",
            "qc": settings["qc"],
        }
        dim = description["features"]["dim"]
        n_cells = merge_parts(run, fields, commits, dim, dtype, chunk_rows, attrs, head_meta, names, qc, part.measured)
        shutil.rmtree(run / "parts", ignore_errors=True)
        if output_format == "anndata":
            write_anndata(run)
        summary = {
            "run": str(run),
            "n_cells": n_cells,
            "n_fields": len(fields),
            "dim": dim,
            "dtype": dtype,
            "channel_names": names,
            "seconds_this_call": time.perf_counter() - started,
            "world_size": env.world_size,
        }
        write_json(run / "embed_summary.json", summary)
        log.info("embedded %d cells from %d fields into %s (D=%d)", n_cells, len(fields), run, dim)
        return summary
    finally:
        if reading is not None:
            reading.close()
        lock.release()


def _already_complete(run: Path, env: DistEnv, output_format: str) -> dict[str, Any]:
    if not env.is_main:
        return {"rank": env.rank}
    summary = json.loads((run / "embed_summary.json").read_text())
    if output_format == "anndata" and not (run / ANNDATA_FILE).exists():
        log.info("%s: writing the AnnData store of the finished run", run)
        write_anndata(run)
    log.info(
        "%s: already complete with these settings (%s cells), nothing to do (--no-resume embeds it again)",
        run,
        summary.get("n_cells"),
    )
    return summary


def _embedding_channels(
    fields: list[FieldInfo], channels: Sequence[str] | None, label_channel: str | None
) -> list[str]:
    available = field_channel_names(fields[0])
    if channels:
        return [available[i] for i in channel_indices(available, list(channels), fields[0].source)]
    return [name for name in available if name != label_channel]


def _not_committed(run: Path, ours: list[int]) -> list[int]:
    """Our fields that a run in ``run`` has not committed yet, as the directory is now (read only): every one for a
    new run, none for a finished one."""
    if (run / "embed_summary.json").exists():
        return []
    done = all_commits(run) if (run / "parts").exists() else {}
    return [index for index in ours if index not in done]
