"""``dinoscope cells embed``: per-cell embeddings of whole screens, resumable and sharded over ranks.

    dinoscope cells embed plate1.ome.zarr plate2.ome.zarr --weights backbone.safetensors --out RUN
    dinoscope cells embed load_data.csv --centroids table --nuclei-table nuclei.csv --weights w.pth --out RUN
    torchrun --nproc_per_node=8 -m core.cli cells embed plates/*.ome.zarr --weights w.safetensors --out RUN

Output, the layout :mod:`bio.profiles` reads: ``RUN/embeddings.zarr`` (zarr v3 group; array ``embeddings``
``[n_cells, D]`` chunked by rows; channel names, normalisation, weights metadata in the group attributes) and
``RUN/cells.parquet`` (``plate, well, site, cell_id, x, y, edge``, row i = embedding row i; with ``--head`` also
``predicted_<label>`` and ``prob_<class>``).

Work is done field by field (DeepProfiler-style crops around nucleus centroids). Rank ``r`` of ``W`` takes fields
``r, r+W, ...`` and writes each field's rows to its own part ``RUN/parts/rank-<r>/``; a field is committed by one
line in the part's ``committed.jsonl`` written only after its rows, so a field interrupted by a crash is simply
redone on resume and no cell is stored twice. Every batch holds crops of one field only, so a field's embeddings do not
depend on its neighbours and a resumed run equals an uninterrupted one. When every field is committed, rank 0
merges the parts in field order into the final store (atomic renames) and removes them. Memory: one field (plus the
next one being read ahead) and one batch of crops.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bio.backbone import CellBackbone
from bio.pretrain_data import CentroidFinder, FieldInfo, field_channel_names, list_fields, open_fields
from core.errors import DinoscopeError
from core.io import atomic_path, write_json
from core.logging import JsonlLogger, progress

log = logging.getLogger(__name__)

EDGE_POLICIES = ("pad", "skip")
DTYPES = ("float32", "float16")
_CHUNK_BYTES = 8 * 2**20
_COLUMNS = ("cell_id", "y", "x", "edge")


@dataclass
class FieldResult:
    """One field's cells: embeddings ``[n, D]``, ids, centroids, edge flags and optional class probabilities."""

    embeddings: np.ndarray
    cell_id: np.ndarray
    y: np.ndarray
    x: np.ndarray
    edge: np.ndarray
    probabilities: np.ndarray | None = None


class PartWriter:
    """One rank's resumable output: a rows file per field and ``committed.jsonl``, one line per finished field.

    A field's rows file is written (atomically) before its commit line, so a crash leaves at worst an uncommitted
    file, which the resumed run simply writes again.
    """

    def __init__(self, part_dir: Path) -> None:
        self.dir = part_dir
        part_dir.mkdir(parents=True, exist_ok=True)
        self.commits = read_commits(part_dir, rewrite=True)
        self.rows = sum(c["n"] for c in self.commits)

    def append(self, field: FieldInfo, result: FieldResult, seconds: float) -> None:
        name = f"field-{field.index:08d}.npz"
        self._write_rows(name, result)
        self._commit(
            {
                "field": field.index,
                "key": field.key,
                "rows": name,
                "n": len(result.cell_id),
                "seconds": round(seconds, 4),
            }
        )
        self.rows += len(result.cell_id)

    def _write_rows(self, name: str, result: FieldResult) -> None:
        arrays = {key: value for key, value in vars(result).items() if value is not None}
        with atomic_path(self.dir / name) as tmp, tmp.open("wb") as handle:
            np.savez(handle, **arrays)

    def _commit(self, record: dict[str, Any]) -> None:
        with (self.dir / "committed.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.commits.append(record)


def read_commits(part_dir: Path, *, rewrite: bool = False) -> list[dict[str, Any]]:
    """Commit records of a part; a torn last line (crash mid-write) is ignored, and removed with ``rewrite``."""
    path = part_dir / "committed.jsonl"
    if not path.exists():
        return []
    records, lines = [], path.read_text().splitlines()
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    if rewrite and len(records) != len(lines):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def _all_commits(run: Path) -> dict[int, tuple[Path, dict[str, Any]]]:
    found: dict[int, tuple[Path, dict[str, Any]]] = {}
    for part in sorted((run / "parts").glob("rank-*")):
        for record in read_commits(part):
            found.setdefault(int(record["field"]), (part, record))
    return found


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
    prefetch: bool = True,
    poll_seconds: float = 1.0,
) -> dict[str, Any]:
    """Embed every cell of OME-Zarr plates and/or LoadData manifests into ``out_dir`` (see the module docstring).

    Args:
        sources: plate roots (``.zarr``) and LoadData CSVs; fields are numbered in this order.
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
        prefetch: read and segment the next field while the current one is embedded.
        poll_seconds: how often rank 0 checks whether the other ranks are done.

    Returns:
        the run summary (also written to ``RUN/embed_summary.json``).
    """
    from core.distributed.env import DistEnv

    env = DistEnv.from_environ()
    run = Path(out_dir)
    for key, value, valid in (("edge", edge, EDGE_POLICIES), ("dtype", dtype, DTYPES)):
        if value not in valid:
            raise DinoscopeError(f"unknown {key} {value!r}", field=key, fix=f"use one of {', '.join(valid)}")
    if crop_size < 1:
        raise DinoscopeError(f"crop size must be positive, got {crop_size}", field="crop_size")
    fields = list_fields(sources)
    finder = CentroidFinder(
        centroids, nuclei_table=nuclei_table, label_channel=label_channel, detect_channel=detect_channel
    )
    names = _embedding_channels(fields, channels, label_channel)
    if env.world_size > 1 and str(device) in ("auto", "cuda"):
        import torch

        device = f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu"
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
        from bio.heads import check_compatible, load_head

        classifier, head_meta = load_head(head)
        check_compatible(head_meta, description, head)
    from bio.preprocess import load_illumination

    flats = load_illumination(illumination) if illumination else None
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
    }
    if _prepare_run(run, settings, resume, env):
        log.info("%s is complete; nothing to do", run)
        return json.loads((run / "embed_summary.json").read_text()) if env.is_main else {"rank": env.rank}
    dim = description["features"]["dim"]
    part = PartWriter(run / "parts" / f"rank-{env.rank:04d}")
    done = set(_all_commits(run))
    mine = [f.index for f in fields if f.index % env.world_size == env.rank and f.index not in done]
    logger = JsonlLogger(run / "embed_log.jsonl")
    started = time.perf_counter()

    def embed_fields() -> Iterator[None]:
        """One tick per embedded cell, so the shared progress bar shows cells/s."""
        loaded = _read_ahead(open_fields(fields, set(mine)), finder, names, flats, prefetch)
        for field, image_data, cents, ids in loaded:
            t0 = time.perf_counter()
            result = _embed_field(backbone, image_data, cents, ids, names, crop_size, edge, classifier, dtype)
            part.append(field, result, time.perf_counter() - t0)
            seconds = time.perf_counter() - t0
            logger.log(
                rank=env.rank,
                field=field.index,
                key=field.key,
                n_cells=len(result.cell_id),
                seconds=seconds,
                cells_per_s=len(result.cell_id) / max(seconds, 1e-9),
            )
            yield from itertools.repeat(None, len(result.cell_id))

    for _ in progress(embed_fields(), desc=f"embed (rank {env.rank}/{env.world_size})", unit="cell"):
        pass
    if not env.is_main:
        return {"rank": env.rank, "fields": len(mine), "rows": part.rows}
    commits = _wait_for_all(run, len(fields), poll_seconds)
    attrs = {
        **description,
        "crops": settings["crops"],
        "centroids": settings["centroids"],
        "sources": settings["sources"],
        "illumination": settings["illumination"],
        "dtype": dtype,
        "head": {k: head_meta[k] for k in ("label", "classes", "sha256", "path")} if head_meta else None,
        "format": "dinoscope.cells.embed/1",
    }
    n_cells = _merge(run, fields, commits, dim, dtype, chunk_rows, attrs, head_meta)
    shutil.rmtree(run / "parts", ignore_errors=True)
    seconds = time.perf_counter() - started
    summary = {
        "run": str(run),
        "n_cells": n_cells,
        "n_fields": len(fields),
        "dim": dim,
        "dtype": dtype,
        "channel_names": names,
        "seconds_this_call": seconds,
        "world_size": env.world_size,
    }
    write_json(run / "embed_summary.json", summary)
    log.info("embedded %d cells from %d fields into %s (D=%d)", n_cells, len(fields), run, dim)
    return summary


def _embedding_channels(
    fields: list[FieldInfo], channels: Sequence[str] | None, label_channel: str | None
) -> list[str]:
    from bio.io import channel_indices

    available = field_channel_names(fields[0])
    if channels:
        return [available[i] for i in channel_indices(available, list(channels), fields[0].source)]
    return [name for name in available if name != label_channel]


def _prepare_run(run: Path, settings: dict[str, Any], resume: bool, env: Any) -> bool:
    """Check or record the run's settings; True when the run is already complete.

    Under several ranks every rank finishes this step before any starts embedding, so no rank reads commits that
    another is about to discard.
    """
    config = run / "embed_config.json"
    complete = False
    if not resume:
        if env.is_main:
            for stale in ("embeddings.zarr", "cells.parquet", "embed_summary.json", "embed_config.json"):
                target = run / stale
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            for part in (run / "parts").glob("rank-*"):
                if int(part.name.split("-")[1]) >= env.world_size:
                    shutil.rmtree(part)
        shutil.rmtree(run / "parts" / f"rank-{env.rank:04d}", ignore_errors=True)
    elif config.exists():
        previous = json.loads(config.read_text())
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise DinoscopeError(
                f"this run was started with different settings ({', '.join(changed)})",
                path=run,
                field=changed[0],
                fix="use a new output directory, or pass --no-resume to start over",
            )
        complete = (run / "embed_summary.json").exists()
    if not complete:
        run.mkdir(parents=True, exist_ok=True)
        write_json(config, settings)
    if env.world_size > 1:
        _start_barrier()
    return complete


def _start_barrier() -> None:
    """One barrier over a temporary gloo group; the end of the run is synchronised through files instead,
    because ranks finish far apart and a collective would time out."""
    import torch.distributed as dist

    from core.distributed.env import init_distributed

    created = not (dist.is_available() and dist.is_initialized())
    init_distributed(backend="gloo")
    dist.barrier()
    if created:
        dist.destroy_process_group()


def _read_ahead(
    opened: Iterator[tuple[FieldInfo, Any]],
    finder: CentroidFinder,
    names: list[str],
    flats: dict[str, np.ndarray] | None,
    prefetch: bool,
) -> Iterator[tuple[FieldInfo, np.ndarray, np.ndarray, np.ndarray]]:
    """Read pixels and find centroids of each field, one field ahead in a worker thread when ``prefetch``."""

    def load(item: tuple[FieldInfo, Any]) -> tuple[FieldInfo, np.ndarray, np.ndarray, np.ndarray]:
        field, image = item
        with image:
            data = np.asarray(image.select(names).read())
            if flats is not None:
                from bio.preprocess import apply_illumination

                for c, name in enumerate(names):
                    if name in flats:
                        data[c] = apply_illumination(data[c], flats[name]).astype(data.dtype)
            cents, ids = finder.find(field, image, data, names)
        return field, data, cents, ids

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


def _embed_field(
    backbone: CellBackbone,
    data: np.ndarray,
    cents: np.ndarray,
    ids: np.ndarray,
    names: list[str],
    crop_size: int,
    edge: str,
    classifier: Any,
    dtype: str,
) -> FieldResult:
    from bio.cells import crop_cells

    parts: list[FieldResult] = []
    for start in range(0, len(cents), backbone.batch_size):
        batch = crop_cells(data, cents[start : start + backbone.batch_size], crop_size, edge=edge)
        kept = start + batch.kept
        emb = backbone.embed(batch.crops, names)
        probs = None
        if classifier is not None:
            from bio.heads import predict_proba

            probs = predict_proba(classifier, emb)
        parts.append(FieldResult(emb.astype(dtype), ids[kept], cents[kept, 0], cents[kept, 1], batch.at_edge, probs))
    if not parts:  # a field without cells still gets committed, with zero rows
        probs = None if classifier is None else np.zeros((0, classifier.head.linear.out_features), np.float32)
        return FieldResult(
            np.zeros((0, backbone.embedding_dim(len(names))), dtype),
            np.zeros(0, np.int64),
            np.zeros(0),
            np.zeros(0),
            np.zeros(0, bool),
            probs,
        )
    joined = {name: np.concatenate([getattr(p, name) for p in parts]) for name in ("embeddings",) + _COLUMNS}
    probs = None if classifier is None else np.concatenate([p.probabilities for p in parts])
    return FieldResult(**joined, probabilities=probs)


def _wait_for_all(run: Path, n_fields: int, poll_seconds: float) -> dict[int, tuple[Path, dict[str, Any]]]:
    while len(commits := _all_commits(run)) < n_fields:
        log.debug("waiting for other ranks: %d of %d fields committed", len(commits), n_fields)
        time.sleep(poll_seconds)
    return commits


def _merge(
    run: Path,
    fields: list[FieldInfo],
    commits: dict[int, tuple[Path, dict[str, Any]]],
    dim: int,
    dtype: str,
    chunk_rows: int,
    attrs: dict[str, Any],
    head_meta: dict[str, Any] | None,
) -> int:
    """Concatenate the parts in field order into ``embeddings.zarr`` + ``cells.parquet``, writing whole chunks."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zarr

    n_total = sum(commits[f.index][1]["n"] for f in fields)
    rows = chunk_rows or max(64, _CHUNK_BYTES // max(1, dim * np.dtype(dtype).itemsize))
    with atomic_path(run / "embeddings.zarr", is_dir=True) as store, atomic_path(run / "cells.parquet") as table:
        group = zarr.open_group(store, mode="w", zarr_format=3)
        group.attrs.update(json.loads(json.dumps({**attrs, "n_cells": n_total, "n_fields": len(fields)}, default=str)))
        array = group.create_array("embeddings", shape=(n_total, dim), chunks=(rows, dim), dtype=dtype)
        writer = pq.ParquetWriter(table, _cells_schema(head_meta))
        pending: list[dict[str, np.ndarray]] = []
        written = buffered = 0
        for field in [*fields, None]:
            if field is not None:
                part, record = commits[field.index]
                with np.load(part / record["rows"]) as stored:
                    rows_of = {name: stored[name] for name in stored.files}
                for key in ("plate", "well", "site"):
                    rows_of[key] = np.full(record["n"], getattr(field, key), dtype=object)
                pending.append(rows_of)
                buffered += record["n"]
            take = buffered if field is None else (buffered // rows) * rows
            if not take:
                continue
            joined = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
            array[written : written + take] = joined["embeddings"][:take]
            writer.write_table(
                pa.table(_cell_columns({k: v[:take] for k, v in joined.items()}, head_meta), schema=writer.schema)
            )
            pending = [{k: v[take:] for k, v in joined.items()}] if buffered > take else []
            written, buffered = written + take, buffered - take
        writer.close()
    return n_total


def _cells_schema(head_meta: dict[str, Any] | None) -> Any:
    import pyarrow as pa

    columns = [
        ("plate", pa.string()),
        ("well", pa.string()),
        ("site", pa.string()),
        ("cell_id", pa.int64()),
        ("x", pa.float64()),
        ("y", pa.float64()),
        ("edge", pa.bool_()),
    ]
    if head_meta:
        columns.append((f"predicted_{head_meta['label']}", pa.string()))
        columns += [(f"prob_{name}", pa.float32()) for name in head_meta["classes"]]
    return pa.schema(columns)


def _cell_columns(rows: dict[str, np.ndarray], head_meta: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {key: rows[key] for key in ("plate", "well", "site", "cell_id", "x", "y", "edge")}
    if head_meta:
        classes = np.asarray(head_meta["classes"], dtype=object)
        probs = rows["probabilities"]
        out[f"predicted_{head_meta['label']}"] = classes[probs.argmax(axis=1)] if len(probs) else classes[:0]
        out.update({f"prob_{name}": probs[:, k] for k, name in enumerate(head_meta["classes"])})
    return out
