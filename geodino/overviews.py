"""A prediction's COG overviews, computed from its rows while they are written instead of from the file at the end.

The COG layout puts the overviews before the full-resolution tiles, so GDAL's COG driver, given a source without
overviews, reads the whole source once to compute them and a second time to copy it. On a 4,000^2 float32 height
map that first pass is half the conversion (0.10 of 0.20 s, on 2 cores), and the conversion is the one step that
runs after the model has finished. The prediction holds every finished row in memory when it stores it, so it
halves them there (:class:`OverviewPyramid`) and stores the overview rows beside them (:func:`write_overview_rows`,
one small GeoTIFF per stored range, all levels stacked); the conversion's source then declares them as its
overviews (:func:`overview_elements`, VRT ``<Overview>`` elements), and GDAL only copies them.

Arithmetic: GDAL's ``AVERAGE`` overviews for powers of two (``gdal/gcore/overview.cpp``, as documented for
``gdaladdo -r average``): each level is the mean of the valid (non-NaN) pixels of the 2 x 2 blocks of the level
before it (GDAL computes a level from the previous one, not from full resolution: measured on GDAL 3.10, the two
differ by up to 2 m next to nodata), NaN where a block holds none. At an odd last row or column the block is the
pixels that remain, but GDAL then uses a ratio slightly below 2 and its averages differ everywhere (measured: up
to 0.4 of the value range on a 1,031-pixel side), so a prediction computes the overviews only when every level
halves exactly (:func:`precomputed_levels`: a 4,000^2 or 8,192^2 raster) and otherwise lets GDAL compute them as
before. The values averaged are those stored (float32 metres, or uint16 codes, rounded back to a code: within
one code of GDAL's integer rounding).

Levels: as many as GDAL's COG driver makes by default, halving until the level fits in one block
(:func:`overview_factors`), so the COG has the same overviews whichever computed them.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio

from core.io import atomic_path
from geodino.partial import disk_errors, output_nodata

COG_BLOCKSIZE = 512  # the COG's block size, which also decides how many overview levels it has
_OVERVIEW_RANGE = re.compile(r"-overview-rows(\d{9})-(\d{9})\.tif$")
_GDAL_TYPES = {"float32": "Float32", "uint16": "UInt16"}


def overview_factors(width: int, height: int, blocksize: int = COG_BLOCKSIZE) -> list[int]:
    """The overview factors (2, 4, ...) GDAL's COG driver gives a ``width`` x ``height`` raster with ``blocksize``
    blocks: doubling the factor while the raster divided by it (rounded down) exceeds one block in a direction
    (checked against GDAL 3.10: 1,025^2 gets one level, 2,049 x 600 two)."""
    factors: list[int] = []
    while width // 2 ** len(factors) > blocksize or height // 2 ** len(factors) > blocksize:
        factors.append(2 ** (len(factors) + 1))
    return factors


def precomputed_levels(width: int, height: int, blocksize: int = COG_BLOCKSIZE) -> int:
    """How many overview levels a prediction computes itself: all of them (:func:`overview_factors`) when every
    level halves the one before exactly (both sizes divisible by the last factor), otherwise none, and GDAL computes
    them (for an odd size GDAL shrinks the ratio below 2 and its averages differ everywhere, not only at the edge)."""
    factors = overview_factors(width, height, blocksize)
    if factors and width % factors[-1] == 0 and height % factors[-1] == 0:
        return len(factors)
    return 0


def level_rows(rows: int, height: int, levels: int) -> list[int]:
    """How many rows of each level the first ``rows`` full-resolution rows of a ``height``-row raster complete:
    a row of a level needs both rows of the level before it, except at the raster's bottom."""
    counts, done = [], rows
    for _ in range(levels):
        done = -(-done // 2) if rows >= height else done // 2
        counts.append(done)
    return counts


def halve(rows: np.ndarray) -> np.ndarray:
    """``n x w`` float32 (NaN = nodata) -> ``ceil(n/2) x ceil(w/2)``: the mean of the valid pixels of each 2 x 2
    block (fewer pixels at an odd last row or column), NaN where none is valid."""
    n, w = rows.shape
    if n % 2 or w % 2:  # only at the raster's edges: pad with nodata to whole blocks
        padded = np.full((n + n % 2, w + w % 2), np.nan, np.float32)
        padded[:n, :w] = rows
        rows = padded
    a, b, c, d = rows[0::2, 0::2], rows[0::2, 1::2], rows[1::2, 0::2], rows[1::2, 1::2]
    out = a + b
    out += c
    out += d
    if not np.isnan(out).any():  # the usual case (NaN would have spread to the sum): four valid pixels everywhere
        out *= np.float32(0.25)
        return out
    missing = np.isnan(rows)
    count = 4 - (missing[0::2, 0::2].astype(np.uint8) + missing[0::2, 1::2] + missing[1::2, 0::2] + missing[1::2, 1::2])
    out = np.nan_to_num(a) + np.nan_to_num(b)
    out += np.nan_to_num(c)
    out += np.nan_to_num(d)
    with np.errstate(divide="ignore", invalid="ignore"):
        out /= count  # 0 / 0 -> NaN where the whole block is nodata
    return out


class OverviewPyramid:
    """The overview rows of a raster whose full-resolution rows arrive top to bottom (module docstring).

    Memory is at most one pending row per level (a level's row waits for the second row of its 2 x 2 blocks).

    Args:
        width, height: the full-resolution raster.
        levels: how many levels (factors 2, 4, ... ``2**levels``).
    """

    def __init__(self, width: int, height: int, levels: int) -> None:
        self.width, self.height, self.levels = width, height, levels
        self.rows_in = 0
        self._pending: list[np.ndarray] = []
        for level in range(levels):
            self._pending.append(np.empty((0, -(-width // 2**level)), np.float32))

    def add(self, rows: np.ndarray) -> list[np.ndarray]:
        """Take the next full-resolution rows (float32 metres, NaN = nodata); return the rows of each level they
        complete (all the remaining ones once the raster's last row is in)."""
        self.rows_in += rows.shape[0]
        last = self.rows_in >= self.height
        made: list[np.ndarray] = []
        for level in range(self.levels):
            source = np.concatenate([self._pending[level], rows]) if self._pending[level].shape[0] else rows
            whole = source.shape[0] if last else source.shape[0] // 2 * 2
            self._pending[level] = source[whole:].copy()
            rows = halve(source[:whole]) if whole else np.empty((0, -(-source.shape[1] // 2)), np.float32)
            made.append(rows)
        return made

    def state(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The pending rows (keys start with ``prefix``), to save with a resumable run's progress."""
        return {f"{prefix}overview_pending_{level}": rows for level, rows in enumerate(self._pending)}

    def restore(self, state: dict[str, np.ndarray], rows_in: int, prefix: str = "") -> None:
        """Continue after ``rows_in`` full-resolution rows, from the pending rows :meth:`state` saved."""
        self.rows_in = rows_in
        self._pending = [np.asarray(state[f"{prefix}overview_pending_{k}"], np.float32) for k in range(self.levels)]


def overview_range_path(partial: Path, first: int, stop: int) -> Path:
    """Where the overview rows completed by full-resolution rows ``[first, stop)`` of ``partial`` are stored."""
    return partial.with_name(f"{partial.stem}-overview-rows{first:09d}-{stop:09d}.tif")


def overview_ranges(partial: Path) -> list[tuple[int, int, Path]]:
    """The stored overview ranges ``(first, stop, file)`` of the partial output ``partial``, in row order."""
    found = []
    for candidate in partial.parent.glob(f"{glob.escape(partial.stem)}-overview-rows*.tif"):
        match = _OVERVIEW_RANGE.search(candidate.name)
        if match:
            found.append((int(match[1]), int(match[2]), candidate))
    return sorted(found)


def overview_rows_stored(partial: Path) -> int:
    """How many full-resolution rows from the top the stored overview ranges cover without a gap."""
    covered = 0
    for first, stop, _ in overview_ranges(partial):
        if first > covered:
            break
        covered = max(covered, stop)
    return covered


def remove_overview_rows(partial: Path) -> None:
    """Delete the stored overview ranges of ``partial`` and any a crash left under a temporary name."""
    for _, _, file in overview_ranges(partial):
        file.unlink(missing_ok=True)
    for file in partial.parent.glob(f".{glob.escape(partial.stem)}-overview-rows*.tmp-*"):
        file.unlink(missing_ok=True)


def write_overview_rows(partial: Path, first: int, stop: int, levels: list[np.ndarray], out_dtype: str) -> None:
    """Store the overview rows (``levels``, encoded as ``out_dtype``) that full-resolution rows ``[first, stop)``
    completed: one GeoTIFF, the levels stacked top to bottom, as wide as the first level (the narrower levels are
    padded with nodata). On disk under its final name when this returns."""
    if not levels:
        return
    width, height = levels[0].shape[1], sum(rows.shape[0] for rows in levels)
    stacked = np.full((max(height, 1), width), output_nodata(out_dtype), out_dtype)
    top = 0
    for rows in levels:
        stacked[top : top + rows.shape[0], : rows.shape[1]] = rows
        top += rows.shape[0]
    profile = {"driver": "GTiff", "width": width, "height": stacked.shape[0], "count": 1, "dtype": out_dtype}
    profile.update(nodata=output_nodata(out_dtype), compress="zstd", zstd_level=1, BIGTIFF="IF_SAFER")
    profile.update(tiled=True, blockxsize=512, blockysize=16)
    target = overview_range_path(partial, first, stop)
    with disk_errors(target), atomic_path(target) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(stacked, 1)


def overview_elements(partial: Path, width: int, height: int, out_dtype: str, *, blocksize: int = COG_BLOCKSIZE) -> str:
    """The VRT ``<Overview>`` elements declaring the stored overview rows of ``partial`` as the overviews of its
    ``width`` x ``height`` band ("" when they are missing or incomplete: GDAL then computes the overviews)."""
    factors = overview_factors(width, height, blocksize)
    stored = overview_ranges(partial)
    if not factors or overview_rows_stored(partial) < height:
        return ""
    nodata = "nan" if out_dtype == "float32" else repr(output_nodata(out_dtype))
    elements = []
    for level, factor in enumerate(factors):
        sources = []
        for first, stop, file in stored:
            done_before, done_after = (level_rows(rows, height, len(factors)) for rows in (first, stop))
            offset = sum(done_after[k] - done_before[k] for k in range(level))
            count = done_after[level] - done_before[level]
            if count:
                w = -(-width // factor)
                sources.append(
                    f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(str(file.resolve()))}</SourceFilename>'
                    f'<SourceBand>1</SourceBand><SrcRect xOff="0" yOff="{offset}" xSize="{w}" ySize="{count}"/>'
                    f'<DstRect xOff="0" yOff="{done_before[level]}" xSize="{w}" ySize="{count}"/></SimpleSource>'
                )
        level_vrt = (
            f'<VRTDataset rasterXSize="{-(-width // factor)}" rasterYSize="{-(-height // factor)}">'
            f'<VRTRasterBand dataType="{_GDAL_TYPES[out_dtype]}" band="1"><NoDataValue>{nodata}</NoDataValue>'
            f"{''.join(sources)}</VRTRasterBand></VRTDataset>"
        )
        elements.append(
            f'<Overview><SourceFilename relativeToVRT="0">{escape(level_vrt)}</SourceFilename>'
            "<SourceBand>1</SourceBand></Overview>"
        )
    return "".join(elements)


def stored_values(stored: np.ndarray, out_dtype: str) -> np.ndarray:
    """Stored rows as the float32 values the pyramid averages, NaN for nodata: float32 metres as they are, uint16
    codes as codes, so the overviews average what the file holds (clipped and rounded), as GDAL would."""
    if out_dtype == "float32":
        return stored
    values = stored.astype(np.float32)
    values[stored == output_nodata(out_dtype)] = np.nan
    return values


def to_stored(values: np.ndarray, out_dtype: str) -> np.ndarray:
    """Overview rows from the pyramid in the stored dtype: uint16 codes rounded, nodata where NaN."""
    if out_dtype == "float32":
        return values
    missing = np.isnan(values)
    codes = np.rint(np.nan_to_num(values)).astype(np.uint16)
    codes[missing] = int(output_nodata(out_dtype))
    return codes
