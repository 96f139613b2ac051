"""Single-cell crops of cell-painting screens for pretraining (``data.kind: cells``).

:class:`SingleCellDataset` serves ``crop_size`` boxes around every nucleus of OME-Zarr plates as ``H x W x C``
float32 arrays with ``channel_names``, the dataset contract of :mod:`core.data` (DeepProfiler-style crops; the SSL
engine applies Cell-DINO's fluorescence augmentation and, for bag-of-channels models, splits channels into samples
itself). Fields and their nuclei come from :mod:`bio.fields`. Decoded fields are cached within a memory budget.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from bio.fields import CentroidFinder, field_channel_names, list_fields
from bio.io import read_image
from core.errors import DinoscopeError
from core.logging import progress

log = logging.getLogger(__name__)


class SingleCellDataset(Dataset):
    """``crop_size`` boxes centred on every nucleus of OME-Zarr plates, as ``H x W x C`` float32 (raw intensities).

    Args:
        plates: OME-Zarr plate roots.
        crop_size: box side in pixels.
        channels: channels to return, in this order (default: all channels of the first field).
        centroids, nuclei_table, label_channel, detect_channel: see :class:`CentroidFinder`; ``detect`` and
            ``labels`` read every field once at construction (with a progress bar).
        edge: ``skip`` drops boxes crossing the field border, ``pad`` zero-pads them.
        max_cells_per_field: keep at most this many cells per field (seeded sample; 0 keeps all).
        seed: seed of that sample.
        cache_mb: decoded fields kept in memory per process (least recently used are dropped).
    """

    def __init__(
        self,
        plates: Sequence[str | os.PathLike],
        *,
        crop_size: int = 64,
        channels: Sequence[str] | None = None,
        centroids: str = "table",
        nuclei_table: str | os.PathLike | None = None,
        label_channel: str | None = None,
        detect_channel: str = "DNA",
        edge: str = "skip",
        max_cells_per_field: int = 0,
        seed: int = 0,
        cache_mb: float = 256,
    ) -> None:
        if crop_size < 1 or edge not in ("skip", "pad"):
            raise DinoscopeError(
                f"need crop_size >= 1 and edge 'skip' or 'pad' (got {crop_size}, {edge!r})",
                field="crop_size" if crop_size < 1 else "edge",
            )
        self.fields = list_fields([plates] if isinstance(plates, (str, os.PathLike)) else list(plates))
        manifests = sorted({str(f.source) for f in self.fields if f.path is None})
        if manifests:
            raise DinoscopeError(
                "pretraining reads OME-Zarr plates only",
                path=manifests[0],
                field="plates",
                fix="convert the manifest's images to an OME-Zarr plate (bio.io.write_ome_zarr_plate)",
            )
        self.crop_size, self.edge = crop_size, edge
        first = field_channel_names(self.fields[0])
        self.channel_names = list(channels) if channels else [c for c in first if c != label_channel]
        finder = CentroidFinder(
            centroids, nuclei_table=nuclei_table, label_channel=label_channel, detect_channel=detect_channel
        )
        rng = np.random.default_rng(seed)
        field_of, centres = [], []
        for field in progress(self.fields, total=len(self.fields), desc="indexing cells", unit="field"):
            with read_image(field.path) as image:
                found, _ = finder.find(field, image)
                height, width = image.shape[1:]
            keep = self._inside(found, height, width)
            if max_cells_per_field and keep.sum() > max_cells_per_field:
                keep[rng.choice(np.flatnonzero(keep), keep.sum() - max_cells_per_field, replace=False)] = False
            centres.append(found[keep])
            field_of.append(np.full(int(keep.sum()), field.index, np.int32))
        self.centres = np.concatenate(centres).astype(np.float32) if centres else np.zeros((0, 2), np.float32)
        self.field_of = np.concatenate(field_of) if field_of else np.zeros(0, np.int32)
        if not len(self.centres):
            raise DinoscopeError(
                "no cells found in the plates",
                path=self.fields[0].source,
                field="centroids",
                fix="check the nuclei table / label images, or use edge='pad'",
            )
        self.cache_mb = cache_mb
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def _inside(self, centres: np.ndarray, height: int, width: int) -> np.ndarray:
        centre = np.floor(centres + 0.5)
        keep = (
            np.isfinite(centres).all(axis=1)
            & (centre >= 0).all(axis=1)
            & (centre[:, 0] < height)
            & (centre[:, 1] < width)
        )
        if self.edge == "skip":
            half = self.crop_size // 2
            keep &= (
                (centre[:, 0] - half >= 0)
                & (centre[:, 1] - half >= 0)
                & (centre[:, 0] - half + self.crop_size <= height)
                & (centre[:, 1] - half + self.crop_size <= width)
            )
        return keep

    def __len__(self) -> int:
        return len(self.centres)

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(index)
        data = self._field(int(self.field_of[index]))
        size = self.crop_size
        top, left = (np.floor(self.centres[index] + 0.5).astype(np.int64) - size // 2).tolist()
        _, height, width = data.shape
        y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + size, height), min(left + size, width)
        out = np.zeros((size, size, data.shape[0]), np.float32)
        out[y0 - top : y1 - top, x0 - left : x1 - left] = np.moveaxis(data[:, y0:y1, x0:x1], 0, -1)
        return out

    def _field(self, field_index: int) -> np.ndarray:
        """A field's pixels, decoded once and kept while they fit in ``cache_mb`` (least recently used first out).

        Stores decode whole chunks anyway, and random crops return to the same fields often."""
        data = self._cache.pop(field_index, None)
        if data is None:
            with read_image(self.fields[field_index].path, self.channel_names) as image:
                data = image.read()
        self._cache[field_index] = data
        while len(self._cache) > 1 and sum(a.nbytes for a in self._cache.values()) > self.cache_mb * 2**20:
            self._cache.popitem(last=False)
        return data

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()  # every DataLoader worker fills its own cache
        return state


def build_cells_dataset(
    *,
    plates: str | os.PathLike | Sequence[str | os.PathLike],
    crop_size: int = 64,
    channels: Sequence[str] | None = None,
    centroids: str = "table",
    nuclei_table: str | os.PathLike | None = None,
    label_channel: str | None = None,
    detect_channel: str = "DNA",
    edge: str = "skip",
    max_cells_per_field: int = 0,
    seed: int = 0,
    cache_mb: float = 256,
    **unexpected: Any,
) -> SingleCellDataset:
    """Factory for the recipe ``data.kind: cells``; the arguments are those of :class:`SingleCellDataset`."""
    if unexpected:
        accepted = [
            "plates",
            "crop_size",
            "channels",
            "centroids",
            "nuclei_table",
            "label_channel",
            "detect_channel",
            "edge",
            "max_cells_per_field",
            "seed",
            "cache_mb",
        ]
        raise DinoscopeError(
            f"unknown keys {sorted(unexpected)} for data.kind cells",
            field=f"data.params.{sorted(unexpected)[0]}",
            fix=f"the accepted keys are {accepted}",
        )
    plates = [plates] if isinstance(plates, (str, os.PathLike)) else [str(p) for p in plates]
    return SingleCellDataset(
        plates,
        crop_size=crop_size,
        channels=list(channels) if channels else None,
        centroids=centroids,
        nuclei_table=nuclei_table,
        label_channel=label_channel,
        detect_channel=detect_channel,
        edge=edge,
        max_cells_per_field=max_cells_per_field,
        seed=seed,
        cache_mb=cache_mb,
    )


# Keywords that name input paths, checked by `dinoscope launch` before a run (core.data.datasets contract).
build_cells_dataset.input_params = ("plates", "nuclei_table")  # type: ignore[attr-defined]
