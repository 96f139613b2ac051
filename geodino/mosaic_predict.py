"""Prediction of many rasters as mosaics: one COG per input on its own grid plus ``mosaic.vrt``, or one COG per mosaic.

Inputs are grouped by CRS and pixel grid (:func:`geodino.mosaic.group_rasters`); each input is predicted as a window
of its group's mosaic, so tiles along its borders read the neighbours' pixels and heights join without seams
(:class:`geodino.mosaic.RegionSource`). Each input is still its own job: ranks share the jobs, every job resumes
from its own partial file, and every output records the input *and the neighbours* it was made from
(:mod:`geodino.outputs`), so replacing a neighbour makes the output "made differently".
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import DinoscopeError
from core.lock import OutputLock
from geodino.mosaic import MosaicGroup, MosaicSource, RegionSource, group_rasters
from geodino.outputs import RECORD_VERSION, check_output_path, content_id, output_state, refuse_different
from geodino.plots import raster_preview
from geodino.predict import ModelFn, predict_raster
from geodino.values import InputRule
from geodino.vrt import write_vrt

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Job:
    """One output of a run: the input ``index`` of ``group`` (None: the whole mosaic) into ``outputs``."""

    group: MosaicGroup
    index: int | None
    outputs: list[Path]


def plan_jobs(groups: list[MosaicGroup], out: Path, *, one_cog: bool, one_file: bool, uncertainty: bool) -> list[Job]:
    """The outputs of every input (``out/<stem>.tif``) or of every mosaic (``mosaic.tif`` / ``mosaic_<key>.tif``)."""

    def with_std(path: Path) -> list[Path]:
        return [path] + ([path.with_name(f"{path.stem}_std{path.suffix}")] if uncertainty else [])

    if one_cog:
        if one_file and len(groups) > 1:
            raise DinoscopeError(
                f"the inputs form {len(groups)} mosaics (different CRSs or pixel grids: "
                f"{', '.join(g.key for g in groups)}), which cannot share one COG",
                path=out,
                field="out",
                fix="give a directory as --out: each mosaic gets mosaic_<CRS>.tif",
            )
        names = (
            [out] if one_file else [out / ("mosaic.tif" if len(groups) == 1 else f"mosaic_{g.key}.tif") for g in groups]
        )
        return [Job(g, None, with_std(name)) for g, name in zip(groups, names, strict=True)]
    stems = [m.path.stem for g in groups for m in g.members]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise DinoscopeError(
            f"several inputs share the file name(s) {duplicates}, so their outputs would clash",
            path=out,
            field="inputs",
            fix="rename the inputs or predict them into separate directories",
        )
    return [Job(g, k, with_std(out / f"{m.path.stem}.tif")) for g in groups for k, m in enumerate(g.members)]


def predict_many(
    model_fn: ModelFn,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    normaliser: Callable[..., np.ndarray],
    bands: Sequence[int | str] | None = None,
    convert: InputRule | None = None,
    uncertainty: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    mosaic: bool = True,
    one_cog: bool = False,
    record_base: dict[str, Any] | None = None,
    overwrite: bool = False,
    preview: bool = False,
    **predict_kwargs: Any,
) -> list[Path]:
    """Predict every input raster seamlessly with its neighbours into ``out/<stem>.tif`` plus ``out/mosaic.vrt``.

    Args:
        inputs: raster files; those sharing a CRS and pixel grid form one mosaic (``mosaic_<key>.vrt`` per mosaic
            when there are several).
        out: a directory, or with ``one_cog`` and one mosaic also a ``.tif`` path.
        convert: input rule applied to every read (:mod:`geodino.values`).
        rank, world_size: this process's share of the jobs (default ``RANK`` / ``WORLD_SIZE``); one process locks
            ``out`` for the whole run, several ranks lock each output they write instead.
        mosaic: write the VRT over the per-input outputs (by rank 0 after a barrier when a process group is up,
            otherwise by whichever rank finds every output present).
        one_cog: one COG per mosaic instead of one per input (``--mosaic``).
        record_base: ``{"model": ..., **settings}``; completed with each job's input and neighbours into its record.
            An output made the same way is skipped; one made differently is refused unless ``overwrite``. Without it
            every existing output is skipped.
        preview: write ``<output>.png`` (input RGB beside the heights) for every height output.
        predict_kwargs: for :func:`geodino.predict.predict_raster` (``tile``, ``overlap``, ``out_dtype``...).

    Returns:
        the height outputs predicted (or found) by this rank.

    Example::

        from geodino import load_canopy_model, predict_many
        model = load_canopy_model("model.safetensors")
        cogs = predict_many(model.predict_batch, ["t_00.tif", "t_01.tif"], "chm/", normaliser=model.normaliser)
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    one_file = one_cog and Path(out).suffix.lower() in (".tif", ".tiff")
    out = check_output_path(out, is_dir=not one_file)
    groups = group_rasters([Path(p) for p in inputs])
    jobs = plan_jobs(groups, out, one_cog=one_cog, one_file=one_file, uncertainty=uncertainty)
    margin = int(predict_kwargs.get("tile", 256))
    ids: dict[Path, dict[str, Any]] = {}
    mine = jobs[rank::world_size]
    lock = OutputLock(out, what="prediction directory", is_dir=not one_file) if world_size == 1 else None
    with lock or contextlib.nullcontext():
        todo, conflicts = [], []
        for job in mine:
            record = _record(job, record_base, margin, ids) if record_base is not None else None
            state, differences = ("complete" if all(p.exists() for p in job.outputs) else "missing"), []
            if record is not None:
                state, differences = output_state(job.outputs, record)
            if state == "complete":
                log.info("%s is already complete (same model, settings and inputs): skipped", job.outputs[0])
            elif state == "different" and not overwrite:
                conflicts.append((job.outputs[0], differences))
            else:
                todo.append((job, record))
        if conflicts:
            refuse_different(conflicts)
        for job, record in todo:
            job_lock = OutputLock(job.outputs[0], what="prediction", is_dir=False) if lock is None else None
            with job_lock or contextlib.nullcontext(), MosaicSource(job.group, bands, convert) as source:
                region = source if job.index is None else RegionSource(source, job.index, margin)
                std = job.outputs[1] if uncertainty else None
                predict_raster(
                    model_fn, region, normaliser, job.outputs[0], uncertainty_path=std, record=record, **predict_kwargs
                )
        if preview:
            for job in mine:
                with MosaicSource(job.group, bands) as source:
                    rgb = source if job.index is None else source.member_source(job.index)
                    raster_preview(job.outputs[0], rgb=rgb)
        if mosaic and not one_cog:
            _write_mosaics(groups, jobs, out, rank, uncertainty)
    return [job.outputs[0] for job in mine]


def _member_path(job: Job) -> Path:
    return job.group.members[job.index].path  # type: ignore[index]


def _write_mosaics(groups: list[MosaicGroup], jobs: list[Job], out: Path, rank: int, uncertainty: bool) -> None:
    """``mosaic.vrt`` (and ``mosaic_std.vrt``) over each mosaic's outputs; ``mosaic_<key>.vrt`` when several."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        torch.distributed.barrier()
    outputs = [p for job in jobs for p in job.outputs]
    if not (rank == 0 if distributed else all(p.exists() for p in outputs)):
        return
    for group in groups:
        mine = [job for job in jobs if job.group is group]
        suffix = "" if len(groups) == 1 else f"_{group.key}"
        write_vrt([job.outputs[0] for job in mine], out / f"mosaic{suffix}.vrt")
        if uncertainty:
            write_vrt([job.outputs[1] for job in mine], out / f"mosaic{suffix}_std.vrt")


def _record(job: Job, base: dict[str, Any], margin: int, ids: dict[Path, dict[str, Any]]) -> dict[str, Any]:
    """The job's record: ``base`` plus the input (or every member of a mosaic) and the neighbours it reads."""

    def ident(path: Path) -> dict[str, Any]:
        if path not in ids:
            ids[path] = content_id(path)
        return ids[path]

    if job.index is None:
        members = [ident(m.path) for m in job.group.members]
        digest = hashlib.sha256("".join(str(m["sha256"]) for m in members).encode()).hexdigest()
        source = {
            "name": f"mosaic of {len(members)} rasters",
            "bytes": sum(m["bytes"] or 0 for m in members),
            "sha256": digest,
        }
        context: list[Any] = []
    else:
        source = ident(_member_path(job))
        neighbours = job.group.neighbours(job.index, margin)
        context = sorted([ident(m.path)["name"], ident(m.path)["sha256"]] for m in neighbours)
    return {"version": RECORD_VERSION, "input": source, **base, "neighbours": context}
