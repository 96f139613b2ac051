"""Core datasets, the dataset contract, and the name -> factory table of dataset kinds.

Contract (implemented by the datasets of every package): ``dataset[i]`` is an ``H x W x C`` numpy array of dtype
uint8, uint16 or float32, and the dataset has ``channel_names: list[str]``. A labelled dataset returns
``(array, int_label)`` and has ``classes: list[str]``. A kind's factory declares which of its keyword arguments name
input paths in ``factory.input_params`` (a tuple of names), so that ``dinoscope launch`` checks them before a run.

Domain packages add kinds through the ``dinoscope.datasets`` entry-point group; :func:`build_dataset` looks there
after :data:`DATASET_KINDS`. Also here: scaling to [0, 1] by dtype and the per-channel statistics used to normalise
crops; reading image files to the contract is in :mod:`core.data.images`.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from core.data.images import CONTRACT_DTYPES, IMAGE_EXTENSIONS, read_image, read_num_channels
from core.data.manifest import ManifestDataset, read_manifest
from core.data.synthetic_scenes import SyntheticScenesDataset, balanced_classes
from core.errors import DinoscopeError
from core.logging import progress
from core.weights.meta import default_channel_names

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dinoscope.datasets"


class ImageFolderDataset(Dataset):
    """Every PNG, JPEG or TIFF under ``root`` (recursive), with any number of channels.

    Args:
        root: folder to search; hidden files (names starting with ``.``) are skipped.
        channel_names: one name per channel; defaults to ``red, green, blue`` for 3 channels, ``ch0..`` otherwise.
        labelled: return ``(image, label)`` with the class taken from the first sub-folder under ``root``.
        extensions: file suffixes to include (case-insensitive).

    All files must have the same channel count; the headers are read once at construction to check it, so a
    corrupt or mixed folder fails before training starts.
    """

    input_params = ("root",)  # recipe keywords that name input paths (see the module docstring)

    def __init__(
        self,
        root: str | os.PathLike,
        channel_names: Sequence[str] | None = None,
        labelled: bool = False,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DinoscopeError(
                "the image folder does not exist or is not a directory",
                path=self.root,
                field="root",
                fix="point `root` at a folder of PNG/JPEG/TIFF images",
            )
        suffixes = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
        self.files = sorted(
            str(p)
            for p in self.root.rglob("*")
            if p.suffix.lower() in suffixes and not p.name.startswith(".") and p.is_file()
        )
        if not self.files:
            raise DinoscopeError(
                f"no image files with extensions {sorted(suffixes)} were found",
                path=self.root,
                field="root",
                fix="check the folder, or pass `extensions` matching your files",
            )
        self.labelled = labelled
        self.classes: list[str] = []
        self.targets: list[int] = []
        if labelled:
            self._assign_labels()
        self.num_channels = self._scan_channel_counts()
        names = default_channel_names(self.num_channels) if channel_names is None else list(channel_names)
        if len(names) != self.num_channels:
            raise DinoscopeError(
                f"{len(names)} channel names were given but the images have {self.num_channels} channels",
                path=self.root,
                field="channel_names",
                fix=f"give exactly {self.num_channels} names, one per channel",
            )
        self.channel_names = names

    def _assign_labels(self) -> None:
        class_of_file = []
        for file in self.files:
            parts = Path(file).relative_to(self.root).parts
            if len(parts) < 2:
                raise DinoscopeError(
                    "in labelled mode every image must sit in a class sub-folder",
                    path=file,
                    field="labelled",
                    fix="move the file into <root>/<class>/ or use labelled=False",
                )
            class_of_file.append(parts[0])
        self.classes = sorted(set(class_of_file))
        index = {name: i for i, name in enumerate(self.classes)}
        self.targets = [index[name] for name in class_of_file]

    def _scan_channel_counts(self) -> int:
        counts: dict[int, str] = {}
        for file in progress(self.files, total=len(self.files), desc="reading image headers", unit="file"):
            counts.setdefault(read_num_channels(file), file)
        if len(counts) > 1:
            examples = ", ".join(f"{c} channels: {Path(f).name}" for c, f in sorted(counts.items()))
            raise DinoscopeError(
                f"the images have different channel counts ({examples})",
                path=self.root,
                field="channels",
                fix="keep one channel layout per dataset folder",
            )
        return next(iter(counts))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> np.ndarray | tuple[np.ndarray, int]:
        path = self.files[index]
        image = read_image(path)
        if image.shape[-1] != self.num_channels:
            raise DinoscopeError(
                f"the image has {image.shape[-1]} channels, the dataset {self.num_channels}",
                path=path,
                field="channels",
                fix="keep one channel layout per dataset folder",
            )
        return (image, self.targets[index]) if self.labelled else image


class SyntheticShapesDataset(Dataset):
    """Deterministic textured shapes: a labelled toy set that a tiny ViT learns in a few hundred CPU steps.

    Each class pairs a silhouette with a texture (disk + horizontal stripes, square + vertical stripes, triangle +
    checkerboard, ring + dots), so crops that miss the outline still carry the class in their texture. Position,
    size, texture period and phase, per-channel gains, background level and noise vary per image. Image ``i``
    depends only on ``(seed, i)``; label ``i % num_classes`` keeps the classes balanced.

    Args:
        n: number of images.
        size: side length in pixels.
        channels: channel count (every channel shows the same scene with its own gain and background).
        seed: generator seed.
        labelled: return ``(image, label)`` instead of the image alone.
        num_classes: 2 to 4 classes, taken in the order of :attr:`CLASS_NAMES`.
    """

    CLASS_NAMES = ("disk_hstripes", "square_vstripes", "triangle_checker", "ring_dots")
    input_params = ()  # generated in memory: reads no files

    def __init__(
        self,
        n: int = 512,
        size: int = 64,
        channels: int = 3,
        seed: int = 0,
        labelled: bool = False,
        num_classes: int = 4,
    ) -> None:
        if n < 1 or size < 8 or channels < 1:
            raise DinoscopeError(
                f"need n >= 1, size >= 8 and channels >= 1, got n={n}, size={size}, channels={channels}",
                field="synthetic_shapes",
            )
        self.n, self.size, self.channels, self.seed = n, size, channels, seed
        self.labelled = labelled
        self.classes, self.targets = balanced_classes(self.CLASS_NAMES, num_classes, n)
        self.channel_names = default_channel_names(channels)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> np.ndarray | tuple[np.ndarray, int]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        label = self.targets[index]
        image = self._draw(np.random.default_rng([self.seed, index]), label)
        return (image, label) if self.labelled else image

    def _draw(self, rng: np.random.Generator, label: int) -> np.ndarray:
        size = self.size
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        dy, dx = yy - rng.uniform(0.35, 0.65) * size, xx - rng.uniform(0.35, 0.65) * size
        radius = rng.uniform(0.25, 0.4) * size
        period = rng.uniform(size / 10, size / 6)
        phase = rng.uniform(0, 2 * np.pi)
        wave_y, wave_x = 2 * np.pi * yy / period + phase, 2 * np.pi * xx / period + phase
        distance = np.hypot(dx, dy)
        if label == 0:
            inside, texture = distance <= radius, np.sin(wave_y) > 0
        elif label == 1:
            inside, texture = np.maximum(abs(dx), abs(dy)) <= 0.85 * radius, np.sin(wave_x) > 0
        elif label == 2:
            inside = (dy >= -radius) & (dy <= 0.8 * radius) & (abs(dx) <= (dy + radius) / 1.8)
            texture = (np.floor(wave_x / np.pi) + np.floor(wave_y / np.pi)) % 2 == 0
        else:
            inside = (distance <= radius) & (distance >= 0.55 * radius)
            texture = np.sin(wave_x) * np.sin(wave_y) > 0.5
        gain = rng.uniform(0.6, 1.0, self.channels).astype(np.float32)
        background = rng.uniform(0.05, 0.3, self.channels).astype(np.float32)
        foreground = (0.45 + 0.55 * texture.astype(np.float32))[..., None] * gain
        image = np.where(inside[..., None], foreground, background)
        image += rng.normal(0.0, 0.04, image.shape).astype(np.float32)
        return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def build_manifest_dataset(manifest: str | os.PathLike, sources: Sequence[dict] | None = None) -> ManifestDataset:
    """Factory of ``data.kind: manifest`` (:mod:`core.data.manifest`): the rows of a curated manifest, served from
    the dataset kinds recorded in it (or ``sources``: ``[{kind, params}]``, e.g. for a manifest curated from .npy)."""
    table = read_manifest(manifest)
    specs = [dict(s) for s in sources] if sources else table.sources
    datasets = [build_dataset(s["kind"], **dict(s.get("params") or {})) for s in specs] if specs else None
    return ManifestDataset(table, datasets, where=manifest)


build_manifest_dataset.input_params = ("manifest",)  # type: ignore[attr-defined]

DATASET_KINDS: dict[str, Callable[..., Dataset]] = {
    "image_folder": ImageFolderDataset,
    "manifest": build_manifest_dataset,
    "synthetic_scenes": SyntheticScenesDataset,
    "synthetic_shapes": SyntheticShapesDataset,
}


def dataset_kinds() -> dict[str, Callable[..., Dataset] | EntryPoint]:
    """Core kinds plus the (not yet imported) entry points of the ``dinoscope.datasets`` group.

    A plugin kind with the same name as a core kind is ignored, with a warning.
    """
    kinds: dict[str, Callable[..., Dataset] | EntryPoint] = dict(DATASET_KINDS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in kinds:
            log.warning("dataset kind %r from %s is shadowed by the core kind", ep.name, ep.value)
            continue
        kinds[ep.name] = ep
    return kinds


def build_dataset(kind: str, **kwargs: Any) -> Dataset:
    """Build a dataset of kind ``kind`` (see :func:`dataset_kinds`) from keyword arguments.

    Unknown kinds and keyword arguments the factory does not take raise :class:`DinoscopeError` naming the valid
    choices.
    """
    kinds = dataset_kinds()
    if kind not in kinds:
        raise DinoscopeError(
            f"unknown dataset kind {kind!r}", field="kind", fix=f"use one of: {', '.join(sorted(kinds))}"
        )
    factory = kinds[kind]
    if not callable(factory) and hasattr(factory, "load"):  # an entry point (duck-typed: backports differ)
        try:
            factory = factory.load()
        except ImportError as err:
            raise DinoscopeError(
                f"the dataset kind {kind!r} could not be imported ({err})",
                field="kind",
                fix=f"install the package that provides {factory.value}",
            ) from None
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as err:
        accepted = [n for n in inspect.signature(factory).parameters if n not in ("self", "args", "kwargs")]
        raise DinoscopeError(
            f"invalid arguments for dataset kind {kind!r}: {err}",
            field="data",
            fix=f"{kind} accepts: {', '.join(accepted)}",
        ) from None
    dataset = factory(**kwargs)
    if not hasattr(dataset, "channel_names"):
        raise TypeError(f"dataset kind {kind!r} built a {type(dataset).__name__} without `channel_names`")
    return dataset


def scale_to_unit(image: np.ndarray, max_value: float | None = None) -> np.ndarray:
    """Float32 copy of ``image`` scaled to [0, 1]: uint8 / 255, uint16 / 65535, float as-is.

    ``max_value``, when given, is the divisor for every dtype (e.g. 4095 for 12-bit sensors in uint16, 10000 for
    reflectance stored as float).
    """
    if max_value is not None:
        if max_value <= 0:
            raise DinoscopeError(f"max_value must be positive, got {max_value}", field="max_value")
        return image.astype(np.float32) / np.float32(max_value)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255.0)
    if image.dtype == np.uint16:
        return image.astype(np.float32) / np.float32(65535.0)
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32, copy=True)
    raise DinoscopeError(
        f"images of dtype {image.dtype} cannot be scaled without a max_value",
        field="dtype",
        fix=f"convert the data to one of {', '.join(CONTRACT_DTYPES)} or pass max_value",
    )


def compute_channel_stats(
    dataset: Dataset, n_samples: int = 1000, seed: int = 0, max_value: float | None = None
) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of the [0, 1]-scaled values of a random sample of images.

    Sampling is without replacement and seeded; sums accumulate in float64 one image at a time, so memory does not
    grow with ``n_samples``. Non-finite values (NaN nodata) are ignored. Labelled datasets are accepted.
    """
    n_total = len(dataset)  # type: ignore[arg-type]
    if n_total == 0 or n_samples < 1:
        raise DinoscopeError("channel statistics need at least one image", field="n_samples")
    picks = np.random.default_rng(seed).choice(n_total, size=min(n_samples, n_total), replace=False)
    total = total_sq = count = None
    for index in progress(picks.tolist(), total=len(picks), desc="channel statistics", unit="img"):
        item = dataset[index]
        image = item[0] if isinstance(item, tuple) else item
        values = scale_to_unit(image[..., None] if image.ndim == 2 else image, max_value)
        values = values.reshape(-1, values.shape[-1]).astype(np.float64)
        finite = np.isfinite(values)
        values[~finite] = 0.0
        if total is None:
            total, total_sq, count = (np.zeros(values.shape[1]) for _ in range(3))
        if values.shape[1] != total.shape[0]:
            raise DinoscopeError(
                f"image {index} has {values.shape[1]} channels, earlier ones {total.shape[0]}", field="channels"
            )
        total += values.sum(0)
        total_sq += np.square(values).sum(0)
        count += finite.sum(0)
    count = np.maximum(count, 1)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean.tolist(), std.tolist()
