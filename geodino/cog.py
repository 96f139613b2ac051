"""Canopy-height rasters on disk: value encoding, a resumable partial GeoTIFF, COG conversion and VRT mosaics.

Encodings: ``float32`` metres with nodata NaN (the HRCH notebook's output), or ``uint16``
holding ``round(metres * uint16_scale)`` with nodata 65535 and the GDAL band scale ``1 / uint16_scale`` so GDAL
aware readers (QGIS, rasterio ``scales``, exactextract) see metres. 0 is a real height, so it is never nodata.

GDAL's COG layout cannot be written incrementally, so prediction first fills a tiled GeoTIFF row range by row
range (the file is closed after every range, so a crash never leaves unflushed rows behind a progress record),
then :func:`write_cog` converts it with GDAL's COG driver. :class:`ResumableOutputs` ties this together with a progress
sidecar so an interrupted run can continue.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.errors import RasterioError
from rasterio.windows import Window
from rio_cogeo.cogeo import cog_validate

from core.errors import DinoscopeError
from core.io import atomic_path, write_json

log = logging.getLogger(__name__)

SIDECAR_VERSION = 1
UINT16_NODATA = 65535
OUT_DTYPES = ("float32", "uint16")
COG_CACHE_BYTES = 16 << 20


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


def output_nodata(out_dtype: str) -> float:
    """NaN for float32 metres, 65535 for scaled uint16."""
    return float("nan") if out_dtype == "float32" else float(UINT16_NODATA)


def encode_heights(values: np.ndarray, valid: np.ndarray, out_dtype: str, uint16_scale: float) -> np.ndarray:
    """Metres (float) -> the stored dtype; invalid pixels become the output nodata value."""
    if out_dtype == "float32":
        out = values.astype(np.float32, copy=True)
        out[~valid] = np.nan
        return out
    scaled = np.nan_to_num(values * np.float32(uint16_scale), nan=0.0)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, UINT16_NODATA - 1, out=scaled)
    out = scaled.astype(np.uint16)
    out[~valid] = UINT16_NODATA
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


def partial_profile(like: Any, out_dtype: str) -> dict[str, Any]:
    """A compressed GeoTIFF profile on ``like``'s grid with flat 512 x 16 blocks.

    Row ranges start on multiples of the tile stride, so with a stride divisible by 16 every block is written
    exactly once; the COG conversion then reads 512 x 512 windows without decompressing whole rows repeatedly.
    """
    return {
        "driver": "GTiff",
        "width": like.width,
        "height": like.height,
        "count": 1,
        "dtype": out_dtype,
        "crs": like.crs,
        "transform": like.transform,
        "nodata": output_nodata(out_dtype),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 16,
        "compress": "zstd",
        "zstd_level": 1,
        "BIGTIFF": "IF_SAFER",
    }


def write_rows(path: Path, row: int, data: np.ndarray) -> None:
    """Write ``data`` (rows x width) at ``row`` and close the file, so the rows are on disk when this returns."""
    if data.shape[0] == 0:
        return
    with disk_errors(path), rasterio.open(path, "r+") as dst:
        dst.write(data, 1, window=Window(0, row, data.shape[1], data.shape[0]))


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """A full disk or quota as an ``OSError`` (ENOSPC / EDQUOT) naming ``path``, which the command line explains in
    one message: GDAL reports it as a generic write error, and a Python file write without the file's name."""
    try:
        yield
    except RasterioError as err:
        text = str(err).lower()
        for code, words in ((errno.ENOSPC, "no space left"), (errno.EDQUOT, "quota exceeded")):
            if words in text:
                raise OSError(code, os.strerror(code), str(path)) from None
        raise
    except OSError as err:
        if err.filename is None and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise


def write_cog(
    partial: Path,
    out_path: Path,
    *,
    out_dtype: str,
    uint16_scale: float,
    tags: dict[str, str],
    description: str = "canopy_height",
    blocksize: int = 512,
) -> Path:
    """Convert the finished partial GeoTIFF into a COG at ``out_path`` (atomically), with average overviews.

    The band carries what GIS tools read: unit type ``m``, scale and offset (``1 / uint16_scale`` and 0 for uint16,
    1 and 0 for float32), a description and nodata. GDAL's own COG driver does the conversion, because it copies
    the band unit type (rio-cogeo's ``cog_translate`` drops it, so QGIS showed no unit).
    """
    scale = 1.0 / uint16_scale if out_dtype == "uint16" else 1.0
    with rasterio.open(partial, "r+") as src:
        src.update_tags(**tags)
        src.set_band_description(1, description)
        src.units = ("m",)
        src.scales = (scale,)
        src.offsets = (0.0,)
    options = {
        "compress": "DEFLATE",
        "predictor": "YES",  # 3 (floating point) for float32, 2 for uint16
        "blocksize": blocksize,
        "overview_resampling": "AVERAGE",
        "BIGTIFF": "IF_SAFER",
    }
    # A small block cache keeps the conversion's memory flat in raster size.
    with (
        disk_errors(out_path),
        atomic_path(out_path) as tmp,
        rasterio.Env(GDAL_CACHEMAX=COG_CACHE_BYTES, GDAL_TIFF_OVR_BLOCKSIZE=str(blocksize)),
    ):
        tmp.unlink(missing_ok=True)
        rasterio.shutil.copy(partial, tmp, driver="COG", **options)
    return out_path


def validate_cog(path: str | os.PathLike) -> tuple[bool, list[str], list[str]]:
    """``(is_valid, errors, warnings)`` from rio-cogeo's validator."""
    return cog_validate(str(path), quiet=True)


class ResumableOutputs:
    """The partial GeoTIFFs of one prediction run, its JSON progress sidecar, and their conversion to COGs.

    Next to ``outputs[0]`` live ``.<name>.partial.tif`` (one per output), ``.<name>.partial.json`` (run config,
    next tile row, name of the carry file) and ``.<name>.partial.json.carry-<row>.npz`` (blending sums that
    overlap the next strip). A commit writes rows, then the new carry, then the sidecar pointing at it, then drops
    the old carry, so the sidecar always describes rows that are on disk. Commits run on a background thread
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
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="strip-writer")
        self._pending: Future[None] | None = None

    def start(self, resume: bool) -> tuple[int, dict[str, np.ndarray] | None]:
        """``(first tile row to predict, carry to restore or None)``; creates fresh partial files when not resuming."""
        state = self._load_state() if resume else None
        if state is not None:
            return state
        self.remove_partials()
        for partial in self.partials:
            with disk_errors(partial), rasterio.open(partial, "w", **partial_profile(self.like, self.out_dtype)):
                pass
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
        """Delete the partial GeoTIFFs, the progress sidecar and every carry file (a fresh start or the end)."""
        carries = self.sidecar.parent.glob(self.sidecar.name + ".carry-*.npz")
        for path in [*self.partials, self.sidecar, *carries]:
            path.unlink(missing_ok=True)

    def _commit(
        self, row_index: int, first_row: int, values: np.ndarray, valid: np.ndarray, carry: dict[str, np.ndarray]
    ) -> None:
        for k, partial in enumerate(self.partials):
            write_rows(partial, first_row, encode_heights(values[k], valid, self.out_dtype, self.uint16_scale))
        carry_path = self._carry_path(row_index + 1)
        with disk_errors(carry_path), open(carry_path, "wb") as f:
            np.savez(f, **carry)
        write_json(
            self.sidecar,
            {"version": SIDECAR_VERSION, "config": self.config, "next_row": row_index + 1, "carry": carry_path.name},
        )
        self._carry_path(row_index).unlink(missing_ok=True)

    def _carry_path(self, next_row: int) -> Path:
        return self.sidecar.with_name(f"{self.sidecar.name}.carry-{next_row}.npz")

    def _load_state(self) -> tuple[int, dict[str, np.ndarray]] | None:
        if not self.sidecar.exists() or not all(p.exists() for p in self.partials):
            return None
        try:
            state = json.loads(self.sidecar.read_text())
            if state.get("version") != SIDECAR_VERSION or state.get("config") != self.config:
                log.warning("%s belongs to a different run; starting over", self.sidecar)
                return None
            with np.load(self.sidecar.with_name(state["carry"])) as carry:
                arrays = {k: carry[k] for k in carry.files}
            log.info("%s: resuming at tile row %d", self.outputs[0], state["next_row"])
            return int(state["next_row"]), arrays
        except (OSError, ValueError, KeyError) as err:
            log.warning("cannot resume from %s (%s); starting over", self.sidecar, err)
            return None
