"""Training chips for canopy-height heads: (image, target, valid) from (image, lidar CHM) raster pairs.

Train/validation split by spatial blocks: neighbouring pixels are strongly correlated, so a random per-chip split
would put near-copies of validation chips into training and overstate accuracy (Roberts et al. 2017,
"Cross-validation strategies for data with temporal, spatial, hierarchical, or phylogenetic structure",
Ecography 40:913-929). The CRS plane is cut into square blocks; each block goes to
validation when a hash of ``(seed, CRS, block)`` falls below ``val_fraction``; chips are laid out inside blocks
only, so no chip straddles two blocks and train and validation footprints never overlap, also across several
rasters in the same CRS. The block grid is anchored at the top-left corner of the first raster in each CRS.

Targets are warped lazily onto each image's grid (:class:`geodino.align.AlignedTarget`). Chips where image or
target is mostly nodata are dropped once, at construction, by streaming one block at a time.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from rasterio.windows import Window
from torch.utils.data import Dataset

from core.errors import DinoscopeError
from geodino.align import AlignedTarget
from geodino.normalise import BandNormaliser
from geodino.raster import RasterSource, check_band_count
from geodino.values import InputRule

log = logging.getLogger(__name__)

Split = Literal["train", "val"]
PathPair = tuple[str | os.PathLike, str | os.PathLike]


class ChipSampler(Dataset):
    """Square chips over (image, target) raster pairs, restricted to one spatial split.

    Args:
        pairs: ``(image_path, target_path)`` tuples; targets may be on any grid and CRS.
        chip_size: chip edge in image pixels.
        stride: step between chips inside a block (default ``chip_size``: no overlap).
        split: ``"train"`` or ``"val"``.
        block_size: block edge in pixels of the first image (default ``4 * chip_size``); at least ``chip_size``.
        val_fraction: expected fraction of blocks assigned to validation.
        seed: changes which blocks are validation blocks.
        max_nodata_fraction: chips with a larger fraction of invalid pixels (image or target) are skipped.
        bands: bands to read from every image (indices or names), default all.
        normaliser: scaling of raw image values; default: global 2-98 percentiles pooled over all images, which
            depends on the images only (not on the split), so train and val scale identically.
        resampling: how targets are resampled onto the image grid (see :data:`geodino.align.RESAMPLING`).
        convert: input rule applied to every image read (:mod:`geodino.values`), before normalisation.

    Items are ``(image float32 C x S x S, target float32 S x S metres, valid bool S x S)``; invalid pixels hold
    0 in image and target. Negative lidar heights are clamped to 0, as in HRCH's evaluation
    (facebookresearch/HighResCanopyHeight ``inference.py``).
    """

    def __init__(
        self,
        pairs: Sequence[PathPair],
        chip_size: int,
        *,
        stride: int | None = None,
        split: Split = "train",
        block_size: int | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
        max_nodata_fraction: float = 0.5,
        bands: Sequence[int | str] | None = None,
        normaliser: BandNormaliser | None = None,
        resampling: str = "bilinear",
        convert: InputRule | None = None,
    ) -> None:
        _check_arguments(pairs, chip_size, stride, split, block_size, val_fraction, max_nodata_fraction)
        self.chip_size = chip_size
        self.stride = stride or chip_size
        self.split = split
        self.block_size = block_size or 4 * chip_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.max_nodata_fraction = max_nodata_fraction
        self.images = [RasterSource(image, bands=bands, convert=convert) for image, _ in pairs]
        for image in self.images[1:]:
            check_band_count(image, self.images[0].count, expected_by=f"the first image ({self.images[0].path})")
        for image in self.images:
            _check_north_up(image)
        self.targets = [
            AlignedTarget(target, like=image, resampling=resampling)
            for image, (_, target) in zip(self.images, pairs, strict=False)
        ]
        if normaliser is None:
            normaliser = BandNormaliser.from_percentiles(self.images)
        elif normaliser.count != self.images[0].count:
            raise DinoscopeError(
                f"the normaliser has {normaliser.count} bands but {self.images[0].count} are selected",
                path=self.images[0].path,
                field="bands",
                fix="select the bands the normalisation was computed for",
            )
        self.normaliser = normaliser
        self.channel_names = self.images[0].band_names
        # Block edge in CRS units, shared by every raster so that rasters in one CRS share one block grid.
        self.block_extent = self.block_size * self.images[0].res[0]
        self._anchors: dict[str, tuple[float, float]] = {}
        self.chips: list[tuple[int, int, int]] = []  # (pair index, col, row)
        for index in range(len(self.images)):
            self.chips.extend(self._scan(index))
        if not self.chips:
            raise DinoscopeError(
                f"no usable {split} chips of {chip_size} px in {len(pairs)} raster pair(s)",
                path=pairs[0][0],
                field="split",
                fix="use larger rasters, a smaller chip_size or block_size, another seed, or a "
                "val_fraction that gives this split some blocks; check nodata coverage",
            )
        log.info("%s split: %d chips of %d px from %d pair(s)", split, len(self.chips), chip_size, len(pairs))

    def __len__(self) -> int:
        return len(self.chips)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pair, col, row = self.chips[index]
        window = Window(col, row, self.chip_size, self.chip_size)
        raw, image_valid = self.images[pair].read(window)
        target, target_valid = self.targets[pair].read(window)
        valid = image_valid & target_valid
        image = self.normaliser(raw, valid=image_valid)
        target = np.where(valid, np.maximum(target, 0.0), np.float32(0)).astype(np.float32)
        return torch.from_numpy(image), torch.from_numpy(target), torch.from_numpy(valid)

    def chip_window(self, index: int) -> tuple[int, Window]:
        """The pair index and pixel window of chip ``index``."""
        pair, col, row = self.chips[index]
        return pair, Window(col, row, self.chip_size, self.chip_size)

    def chip_bounds(self, index: int) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` of chip ``index`` in its image's CRS."""
        pair, window = self.chip_window(index)
        return self.images[pair].window_bounds(window)

    def close(self) -> None:
        """Release the GDAL handles of every image and target."""
        for target in self.targets:
            target.close()
        for image in self.images:
            image.close()

    def block_split(self, crs_key: str, block_x: int, block_y: int) -> Split:
        """The split a block belongs to: a stable hash, uniform in [0, 1), compared with ``val_fraction``."""
        digest = hashlib.blake2b(f"{self.seed}|{crs_key}|{block_x}|{block_y}".encode(), digest_size=8).digest()
        return "val" if int.from_bytes(digest, "big") / 2**64 < self.val_fraction else "train"

    def _scan(self, index: int) -> list[tuple[int, int, int]]:
        image, target = self.images[index], self.targets[index]
        crs_key = image.crs.to_string() if image.crs is not None else "none"
        # The block grid of a CRS starts at the top-left corner of the first raster in that CRS, so rasters on
        # that pixel grid lose no pixels to block borders.
        anchor_x, anchor_y = self._anchors.setdefault(crs_key, (image.transform.c, image.transform.f))
        left, bottom, right, top = image.bounds
        extent, size, eps = self.block_extent, self.chip_size, 1e-6
        x0, y0 = image.transform.c, image.transform.f
        res_x, res_y = image.res
        chips = []
        for block_y in range(math.floor((anchor_y - top) / extent), math.ceil((anchor_y - bottom) / extent)):
            for block_x in range(math.floor((left - anchor_x) / extent), math.ceil((right - anchor_x) / extent)):
                if self.block_split(crs_key, block_x, block_y) != self.split:
                    continue
                # Pixel span of the block, shrunk inwards to whole pixels so every chip lies inside it.
                col_lo = max(0, math.ceil((anchor_x + block_x * extent - x0) / res_x - eps))
                col_hi = math.floor((anchor_x + (block_x + 1) * extent - x0) / res_x + eps)
                row_lo = max(0, math.ceil((y0 - anchor_y + block_y * extent) / res_y - eps))
                row_hi = math.floor((y0 - anchor_y + (block_y + 1) * extent) / res_y + eps)
                cols = [c for c in range(col_lo, col_hi - size + 1, self.stride) if c < image.width]
                rows = [r for r in range(row_lo, row_hi - size + 1, self.stride) if r < image.height]
                if not cols or not rows:
                    continue
                span = Window(cols[0], rows[0], cols[-1] + size - cols[0], rows[-1] + size - rows[0])
                _, image_valid = image.read(span)
                _, target_valid = target.read(span)
                invalid = ~(image_valid & target_valid)
                for row in rows:
                    for col in cols:
                        r, c = row - rows[0], col - cols[0]
                        if invalid[r : r + size, c : c + size].mean() <= self.max_nodata_fraction:
                            chips.append((index, col, row))
        return chips


def make_chip_dataset(
    pairs: Sequence[PathPair],
    chip_size: int,
    *,
    stride: int | None = None,
    split: Split = "train",
    block_size: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_nodata_fraction: float = 0.5,
    bands: Sequence[int | str] | None = None,
    normaliser: BandNormaliser | None = None,
    resampling: str = "bilinear",
    convert: InputRule | None = None,
) -> ChipSampler:
    """Build the chip dataset of one split; see :class:`ChipSampler` for the arguments.

    Call it twice with the same arguments but ``split="train"`` and ``split="val"`` to get disjoint splits;
    pass the train set's ``normaliser`` to the val set when you supply your own scaling.
    """
    return ChipSampler(
        pairs,
        chip_size,
        stride=stride,
        split=split,
        block_size=block_size,
        val_fraction=val_fraction,
        seed=seed,
        max_nodata_fraction=max_nodata_fraction,
        bands=bands,
        normaliser=normaliser,
        resampling=resampling,
        convert=convert,
    )


def _check_arguments(
    pairs: Sequence[PathPair],
    chip_size: int,
    stride: int | None,
    split: str,
    block_size: int | None,
    val_fraction: float,
    max_nodata_fraction: float,
) -> None:
    if not pairs:
        raise DinoscopeError(
            "no (image, target) pairs given", field="pairs", fix="give at least one (image.tif, chm.tif) pair"
        )
    if split not in ("train", "val"):
        raise DinoscopeError(f"unknown split {split!r}", field="split", fix="use 'train' or 'val'")
    if chip_size < 1 or (stride is not None and stride < 1):
        raise DinoscopeError(f"chip_size and stride must be positive (got {chip_size}, {stride})", field="chip_size")
    if block_size is not None and block_size < chip_size:
        raise DinoscopeError(
            f"block_size {block_size} is smaller than chip_size {chip_size}",
            field="block_size",
            fix="a block must hold at least one chip; use block_size >= chip_size",
        )
    if not 0.0 <= val_fraction <= 1.0:
        raise DinoscopeError(f"val_fraction must lie in [0, 1], got {val_fraction}", field="val_fraction")
    if not 0.0 <= max_nodata_fraction <= 1.0:
        raise DinoscopeError(
            f"max_nodata_fraction must lie in [0, 1], got {max_nodata_fraction}", field="max_nodata_fraction"
        )


def _check_north_up(image: RasterSource) -> None:
    t = image.transform
    if t.b != 0 or t.d != 0 or t.a <= 0 or t.e >= 0:
        raise DinoscopeError(
            "the image grid is rotated or flipped; spatial blocks need a north-up grid",
            path=image.path,
            field="transform",
            fix="warp it north-up first, e.g. `gdalwarp SRC DST` without -r options",
        )
