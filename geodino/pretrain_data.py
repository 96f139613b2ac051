"""Random windows over many GeoTIFFs for self-supervised pretraining (recipe ``data.kind: geotiff``).

Each item is one window drawn at random, area-weighted across files, from the selected bands, returned as an
``H x W x C`` float32 array in roughly [0, 1] for the channel-agnostic multi-crop in ``core``. Scaling is global
(per raster, or one :class:`~geodino.normalise.BandNormaliser` for all), never per window, for the reasons given
in :mod:`geodino.normalise`. Windows with too much nodata are redrawn.

Items are reproducible: item ``i`` depends only on ``(seed, epoch, i)``, so any worker draws the same window.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.windows import Window
from torch.utils.data import Dataset

from core.errors import DinoscopeError
from geodino.normalise import BandNormaliser
from geodino.raster import RasterSource, check_band_count

log = logging.getLogger(__name__)

_MAX_DRAWS = 20
_MAX_OPEN_FILES = 32  # bounded GDAL handles per process (torchgeo #1694: unbounded caches exhaust RAM)
_RASTER_SUFFIXES = (".tif", ".tiff", ".vrt")


class GeoTiffWindows(Dataset):
    """Random ``window_size`` windows over ``paths``.

    Args:
        paths: raster files, directories (searched for .tif/.tiff/.vrt) or glob patterns.
        window_size: window edge in pixels.
        bands: bands to read from every file (1-based indices or names), default all; every file must yield the
            same number of bands.
        length: number of items per epoch.
        seed: base of the per-item random draws.
        max_nodata_fraction: windows with more invalid pixels are redrawn (up to 20 times; then the draw with
            the fewest invalid pixels is used).
        normaliser: one scaling for every file; default: per-file global 2-98 percentiles, clipped to [0, 1].

    Files are chosen with probability proportional to their number of distinct window positions, so every
    window position in the collection is about equally likely. Invalid pixels are 0 in the output.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        window_size: int,
        bands: Sequence[int | str] | None = None,
        length: int = 10_000,
        seed: int = 0,
        max_nodata_fraction: float = 0.5,
        normaliser: BandNormaliser | None = None,
    ) -> None:
        if window_size < 1 or length < 1:
            raise DinoscopeError(
                f"window_size and length must be positive (got {window_size}, {length})", field="window_size"
            )
        if not 0.0 <= max_nodata_fraction <= 1.0:
            raise DinoscopeError(
                f"max_nodata_fraction must lie in [0, 1], got {max_nodata_fraction}", field="max_nodata_fraction"
            )
        self.paths = expand_raster_paths(paths)
        self.window_size = window_size
        self.bands = None if bands is None else list(bands)
        self.length = length
        self.seed = seed
        self.epoch = 0
        self.max_nodata_fraction = max_nodata_fraction
        self.normaliser = normaliser
        self._sources: dict[int, RasterSource] = {}
        self._file_normalisers: dict[int, BandNormaliser] = {}
        first = self._source(0)
        self.channel_names = list(first.band_names)
        sizes = []
        for index in range(len(self.paths)):
            source = self._source(index)
            check_band_count(source, first.count, expected_by=f"the first file ({self.paths[0]})")
            sizes.append(max(1, source.width - window_size + 1) * max(1, source.height - window_size + 1))
        if normaliser is not None and normaliser.count != first.count:
            raise DinoscopeError(
                f"the normaliser has {normaliser.count} bands but {first.count} are selected",
                path=self.paths[0],
                field="bands",
                fix="select the bands it was computed for",
            )
        self.weights = np.asarray(sizes, np.float64) / float(sum(sizes))

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Draw different windows in each epoch while keeping every epoch reproducible."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> np.ndarray:
        file_index, _, data, valid = self._draw(index)
        return self._scale(file_index, data, valid).transpose(1, 2, 0).copy()

    def locate(self, index: int) -> tuple[Path, Window]:
        """The file and pixel window item ``index`` is read from (in the current epoch)."""
        file_index, window, _, _ = self._draw(index)
        return self.paths[file_index], window

    def _draw(self, index: int) -> tuple[int, Window, np.ndarray, np.ndarray]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        best: tuple[float, int, Window, np.ndarray, np.ndarray] | None = None
        for _ in range(_MAX_DRAWS):
            file_index = int(rng.choice(len(self.paths), p=self.weights))
            source = self._source(file_index)
            col = int(rng.integers(0, max(1, source.width - self.window_size + 1)))
            row = int(rng.integers(0, max(1, source.height - self.window_size + 1)))
            window = Window(col, row, self.window_size, self.window_size)
            data, valid = source.read(window)
            invalid = 1.0 - float(valid.mean())
            if best is None or invalid < best[0]:
                best = (invalid, file_index, window, data, valid)
            if invalid <= self.max_nodata_fraction:
                break
        else:
            log.debug(
                "item %d: no window with <= %.0f%% nodata in %d draws; using the best (%.0f%%)",
                index,
                100 * self.max_nodata_fraction,
                _MAX_DRAWS,
                100 * best[0],
            )
        return best[1:]

    def _scale(self, file_index: int, data: np.ndarray, valid: np.ndarray) -> np.ndarray:
        if self.normaliser is not None:
            return self.normaliser(data, valid=valid)
        if file_index not in self._file_normalisers:
            self._file_normalisers[file_index] = BandNormaliser.from_percentiles(self._source(file_index))
        scaled = self._file_normalisers[file_index](data, valid=valid)
        return np.clip(scaled, 0.0, 1.0)

    def _source(self, index: int) -> RasterSource:
        source = self._sources.pop(index, None) or RasterSource(self.paths[index], bands=self.bands)
        self._sources[index] = source  # most recently used last
        while len(self._sources) > _MAX_OPEN_FILES:
            self._sources.pop(next(iter(self._sources))).close()
        return source

    def __getstate__(self) -> dict[str, Any]:
        # Open handles stay in this process; each DataLoader worker reopens files on first use.
        state = dict(self.__dict__)
        state["_sources"] = {}
        return state


def expand_raster_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Files, directories (their .tif/.tiff/.vrt files, sorted) and glob patterns -> a sorted, checked list."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in _RASTER_SUFFIXES))
        elif any(ch in str(item) for ch in "*?["):
            found.extend(Path(p) for p in sorted(glob.glob(str(item), recursive=True)))
        else:
            found.append(path)
    if not found:
        raise DinoscopeError(
            f"no raster files found in {items}",
            path=str(items[0]) if items else None,
            field="paths",
            fix="give GeoTIFF/VRT files, a directory holding them, or a glob",
        )
    return found


def build_geotiff_dataset(
    *,
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    window_size: int,
    bands: Sequence[int | str] | None = None,
    length: int = 10_000,
    seed: int = 0,
    max_nodata_fraction: float = 0.5,
    normaliser: BandNormaliser | Mapping[str, Any] | None = None,
    **unexpected: Any,
) -> GeoTiffWindows:
    """Factory for the recipe ``data.kind: geotiff``; the arguments are those of :class:`GeoTiffWindows`.

    ``normaliser`` may also be the :meth:`BandNormaliser.to_dict` record, as written in a recipe.
    """
    if unexpected:
        accepted = ["paths", "window_size", "bands", "length", "seed", "max_nodata_fraction", "normaliser"]
        raise DinoscopeError(
            f"unknown keys {sorted(unexpected)} for data.kind geotiff",
            field=f"data.{sorted(unexpected)[0]}",
            fix=f"the accepted keys are {accepted}",
        )
    if isinstance(normaliser, Mapping):
        normaliser = BandNormaliser.from_dict(dict(normaliser))
    if bands is not None:
        bands = list(bands)  # a recipe's ListConfig -> plain list
    return GeoTiffWindows(
        paths,
        window_size,
        bands=bands,
        length=length,
        seed=seed,
        max_nodata_fraction=max_nodata_fraction,
        normaliser=normaliser,
    )


# Keywords that name input paths, checked by `dinoscope launch` before a run (core.data.datasets contract).
build_geotiff_dataset.input_params = ("paths",)  # type: ignore[attr-defined]
