"""Canopy-height rasters on disk: value encoding, resumable partial outputs and their conversion to COGs.

Encodings: ``float32`` metres with nodata NaN (the HRCH notebook's output), or ``uint16``
holding ``round(metres * uint16_scale)`` with nodata 65535 and the GDAL band scale ``1 / uint16_scale`` so GDAL
aware readers (QGIS, rasterio ``scales``, exactextract) see metres. 0 is a real height, so it is never nodata.

GDAL's COG layout cannot be written incrementally, so prediction first stores each finished row range in the
partial output (:mod:`geodino.partial`: one small GeoTIFF per range, each on disk before the progress record
names it) with their overview rows (:mod:`geodino.overviews`), then :func:`write_cog` converts them with GDAL's
COG driver, compressing on several cores and copying the overviews instead of computing them.
:class:`ResumableOutputs` ties this together with a progress sidecar so an interrupted run can continue.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rio_cogeo.cogeo import cog_validate

from core.errors import DinoscopeError
from core.io import atomic_path, write_json
from geodino.overviews import (
    COG_BLOCKSIZE,
    OverviewPyramid,
    overview_elements,
    overview_rows_stored,
    precomputed_levels,
    remove_overview_rows,
    stored_values,
    to_stored,
    write_overview_rows,
)
from geodino.partial import (
    UINT16_NODATA,
    create_partial,
    disk_errors,
    output_nodata,
    partial_profile,
    partial_vrt,
    ranges_per_window,
    remove_partial,
    rows_stored,
    write_rows,
)

log = logging.getLogger(__name__)

# 2: row ranges in files of their own, and the carry holds only the weighted sums (the weights come from the grid)
# 3: overview rows stored beside the ranges, their pending rows in the carry
SIDECAR_VERSION = 3
OUT_DTYPES = ("float32", "uint16")
COG_CACHE_BYTES = 16 << 20
# GDAL compresses the COG's blocks on this many threads: the cores this process may use, at most 4 (beyond that
# each thread mostly adds memory, and several ranks on one node would oversubscribe it).
COG_THREADS = str(min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
__all__ = [  # what this module defines, and the partial-output helpers it re-exports (geodino.partial)
    "COG_CACHE_BYTES",
    "COG_THREADS",
    "OUT_DTYPES",
    "SIDECAR_VERSION",
    "UINT16_NODATA",
    "ResumableOutputs",
    "check_out_dtype",
    "create_partial",
    "disk_errors",
    "encode_heights",
    "height_tags",
    "output_nodata",
    "partial_profile",
    "validate_cog",
    "write_cog",
    "write_rows",
]


def check_out_dtype(out_dtype: str, uint16_scale: float) -> None:
    """Raise a :class:`DinoscopeError` for an unknown output dtype or a non-positive uint16 scale."""
    if out_dtype not in OUT_DTYPES:
        raise DinoscopeError(f"unknown output dtype {out_dtype!r}", field="out_dtype", fix=f"use one of {OUT_DTYPES}")
    if out_dtype == "uint16" and not uint16_scale > 0:
        raise DinoscopeError(
            f"uint16_scale must be positive, got {uint16_scale}",
            field="uint16_scale",
            fix="use 100 (centimetres) or 10 (decimetres)",
        )


def encode_heights(
    values: np.ndarray, valid: np.ndarray, out_dtype: str, uint16_scale: float, *, in_place: bool = False
) -> np.ndarray:
    """Metres (float) -> the stored dtype; invalid pixels become the output nodata value.

    With ``in_place`` float32 ``values`` are masked and returned themselves instead of copied (the prediction's own
    freshly blended rows, which nothing else reads).
    """
    if out_dtype == "float32":
        out = values.astype(np.float32, copy=not in_place)
        np.copyto(out, np.float32(np.nan), where=~valid)
        return out
    scaled = values * np.float32(uint16_scale)
    np.nan_to_num(scaled, copy=False, nan=0.0)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, UINT16_NODATA - 1, out=scaled)
    out = scaled.astype(np.uint16)
    np.copyto(out, np.uint16(UINT16_NODATA), where=~valid)
    return out


def height_tags(out_dtype: str, uint16_scale: float, quantity: str = "canopy height") -> dict[str, str]:
    """Dataset tags documenting units and scaling for readers that ignore band scale/offset."""
    tags = {"quantity": quantity, "units": "m"}
    if out_dtype == "uint16":
        tags.update(
            scale_factor=repr(1.0 / uint16_scale),
            uint16_scale=repr(float(uint16_scale)),
            encoding=f"metres = value / {uint16_scale:g}; {UINT16_NODATA} = nodata",
        )
    else:
        tags.update(encoding="float32 metres; NaN = nodata")
    return tags


def write_cog(
    partial: Path,
    out_path: Path,
    *,
    out_dtype: str,
    uint16_scale: float,
    tags: dict[str, str],
    description: str = "canopy_height",
    blocksize: int = COG_BLOCKSIZE,
) -> Path:
    """Convert the finished partial output at ``partial`` (:mod:`geodino.partial`) into a COG at ``out_path``
    (atomically), with average overviews.

    The band carries what GIS tools read: unit type ``m``, scale and offset (``1 / uint16_scale`` and 0 for uint16,
    1 and 0 for float32), a description and nodata. GDAL's own COG driver does the conversion, because it copies
    the band unit type (rio-cogeo's ``cog_translate`` drops it, so QGIS showed no unit); it compresses blocks on
    :data:`COG_THREADS` threads: the conversion is the one step that runs after the model has finished. Overview
    rows the prediction stored beside the ranges (:mod:`geodino.overviews`) are copied, not computed again.
    """
    scale = 1.0 / uint16_scale if out_dtype == "uint16" else 1.0
    with rasterio.open(partial) as grid:
        overviews = overview_elements(partial, grid.width, grid.height, out_dtype, blocksize=blocksize)
    source = partial_vrt(partial, tags=tags, description=description, scale=scale, overviews=overviews)
    options = {
        "compress": "DEFLATE",
        "predictor": "YES",  # 3 (floating point) for float32, 2 for uint16
        "blocksize": blocksize,
        "overview_resampling": "AVERAGE",
        "BIGTIFF": "IF_SAFER",
        "num_threads": COG_THREADS,
    }
    # A small block cache, and no more open range files than a block row of the COG reads, keep the conversion's
    # memory flat in raster size (GDAL's VRT would otherwise keep up to 100 range files open).
    env = {"GDAL_CACHEMAX": COG_CACHE_BYTES, "GDAL_TIFF_OVR_BLOCKSIZE": str(blocksize)}
    env["GDAL_MAX_DATASET_POOL_SIZE"] = str(ranges_per_window(partial, blocksize) + 2)
    with disk_errors(out_path), atomic_path(out_path) as tmp, rasterio.Env(**env):
        tmp.unlink(missing_ok=True)
        rasterio.shutil.copy(source, tmp, driver="COG", **options)
    return out_path


def validate_cog(path: str | os.PathLike) -> tuple[bool, list[str], list[str]]:
    """``(is_valid, errors, warnings)`` from rio-cogeo's validator."""
    return cog_validate(str(path), quiet=True)


class ResumableOutputs:
    """The partial outputs of one prediction run, its JSON progress sidecar, and their conversion to COGs.

    Next to ``outputs[0]`` live ``.<name>.partial.tif`` and its row ranges (one partial output per output,
    :mod:`geodino.partial`), ``.<name>.partial.json`` (run config, next tile row, rows stored, name of the carry
    file) and ``.<name>.partial.json.carry-<row>.npz`` (blending sums that overlap the next strip). A commit writes
    rows, then the new carry, then the sidecar pointing at it, then drops the old carry, so the sidecar always
    describes rows that are on disk. Commits run on a background thread
    (at most one in flight) so encoding and compression overlap the model.

    Args:
        outputs: final paths (height, then optionally std).
        like: the input raster (its grid is copied).
        config: everything that must match for a resume to be valid.
    """

    def __init__(
        self, outputs: Sequence[Path], like: Any, *, out_dtype: str, uint16_scale: float, config: dict[str, Any]
    ) -> None:
        self.outputs = [Path(p) for p in outputs]
        self.partials = [p.with_name(f".{p.name}.partial.tif") for p in self.outputs]
        self.sidecar = self.outputs[0].with_name(f".{self.outputs[0].name}.partial.json")
        self.like = like
        self.out_dtype = out_dtype
        self.uint16_scale = uint16_scale
        self.config = config
        levels = precomputed_levels(like.width, like.height)
        self.pyramids = [OverviewPyramid(like.width, like.height, levels) for _ in self.outputs]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="strip-writer")
        self._pending: Future[None] | None = None

    def start(self, resume: bool) -> tuple[int, dict[str, np.ndarray] | None]:
        """``(first tile row to predict, carry to restore or None)``; creates fresh partial files when not resuming."""
        state = self._load_state() if resume else None
        if state is not None:
            next_row, rows, carry = state
            for k, pyramid in enumerate(self.pyramids):
                pyramid.restore(carry, rows, prefix=f"output{k}_")
            return next_row, {name: carry[name] for name in ("sums", "base")}
        self.remove_partials()
        for partial in self.partials:
            create_partial(partial, self.like, self.out_dtype)
        return 0, None

    def commit(
        self, row_index: int, first_row: int, values: np.ndarray, valid: np.ndarray, carry: dict[str, np.ndarray]
    ) -> None:
        """Queue rows ``first_row..`` (``n_outputs x rows x width`` metres) finished by tile row ``row_index``."""
        self.wait()
        self._pending = self._pool.submit(self._commit, row_index, first_row, values, valid, carry)

    def wait(self) -> None:
        """Block until the queued commit is on disk; re-raise its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def finish(self, source_name: str, extra_tags: dict[str, str] | None = None) -> None:
        """Turn every partial file into its COG (with ``extra_tags``), then remove the partial files and the
        sidecar."""
        self.wait()
        quantities = ["canopy height", "canopy height std"]
        for partial, final, quantity in zip(self.partials, self.outputs, quantities, strict=False):
            tags = height_tags(self.out_dtype, self.uint16_scale, quantity) | {"source": source_name}
            tags |= extra_tags or {}
            write_cog(
                partial,
                final,
                out_dtype=self.out_dtype,
                uint16_scale=self.uint16_scale,
                tags=tags,
                description=quantity.replace(" ", "_"),
            )
        self.remove_partials()

    def close(self) -> None:
        """Wait for the queued commit (re-raising its error), then shut the writer thread down; partial files stay."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def remove_partials(self) -> None:
        """Delete the partial outputs, the progress sidecar and every carry file (a fresh start or the end)."""
        for partial in self.partials:
            remove_partial(partial)
            remove_overview_rows(partial)
        carries = self.sidecar.parent.glob(self.sidecar.name + ".carry-*.npz")
        for path in [self.sidecar, *carries]:
            path.unlink(missing_ok=True)

    def _commit(
        self, row_index: int, first_row: int, values: np.ndarray, valid: np.ndarray, carry: dict[str, np.ndarray]
    ) -> None:
        stop_row = first_row + values.shape[1]
        for k, partial in enumerate(self.partials):
            encoded = encode_heights(values[k], valid, self.out_dtype, self.uint16_scale, in_place=True)
            write_rows(partial, first_row, encoded)
            levels = self.pyramids[k].add(stored_values(encoded, self.out_dtype))
            stored = [to_stored(rows, self.out_dtype) for rows in levels]
            write_overview_rows(partial, first_row, stop_row, stored, self.out_dtype)
            carry = carry | self.pyramids[k].state(prefix=f"output{k}_")
        carry_path = self._carry_path(row_index + 1)
        with disk_errors(carry_path), open(carry_path, "wb") as f:
            np.savez(f, **carry)
        state = {"version": SIDECAR_VERSION, "config": self.config, "next_row": row_index + 1}
        write_json(self.sidecar, state | {"rows": stop_row, "carry": carry_path.name})
        self._carry_path(row_index).unlink(missing_ok=True)

    def _carry_path(self, next_row: int) -> Path:
        return self.sidecar.with_name(f"{self.sidecar.name}.carry-{next_row}.npz")

    def _load_state(self) -> tuple[int, int, dict[str, np.ndarray]] | None:
        """``(next tile row, rows stored, carry arrays)`` of a run this one may continue, or None."""
        if not self.sidecar.exists() or not all(p.exists() for p in self.partials):
            return None
        try:
            state = json.loads(self.sidecar.read_text())
            if state.get("version") != SIDECAR_VERSION or state.get("config") != self.config:
                log.warning("%s belongs to a different run; starting over", self.sidecar)
                return None
            levels = self.pyramids[0].levels
            if any(
                rows_stored(p) < state["rows"] or levels and overview_rows_stored(p) < state["rows"]
                for p in self.partials
            ):
                log.warning("%s names rows that are no longer on disk; starting over", self.sidecar)
                return None
            with np.load(self.sidecar.with_name(state["carry"])) as carry:
                arrays = {k: carry[k] for k in carry.files}
            log.info("%s: resuming at tile row %d", self.outputs[0], state["next_row"])
            return int(state["next_row"]), int(state["rows"]), arrays
        except (OSError, ValueError, KeyError) as err:
            log.warning("cannot resume from %s (%s); starting over", self.sidecar, err)
            return None
