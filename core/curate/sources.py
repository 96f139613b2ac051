"""The datasets a collection is embedded from, the metadata of their items, and thumbnails of them.

A source is ``{"kind": ..., "params": {...}}``: any dataset kind of :func:`core.data.datasets.dataset_kinds` (image
folders and the core kinds, and the GeoTIFF windows and cell crops that domain packages register), rebuilt through
:func:`core.data.datasets.build_dataset`, so core never imports a domain package.

What an item is called comes from the dataset, duck-typed (:func:`item_metadata`): a ``describe_item(i)`` method
returning ``{path, window, cell}`` when the dataset has one; otherwise ``locate(i) -> (path, window)`` (windows of
rasters), ``files`` (image folders), or ``fields`` + ``field_of`` + ``centres`` (cell crops around nuclei).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from core.data.datasets import build_dataset, dataset_kinds
from core.errors import DinoscopeError

log = logging.getLogger(__name__)


def path_param(kind: str) -> str | None:
    """The keyword of dataset kind ``kind`` that takes the input path (the first of its ``input_params``)."""
    kinds = dataset_kinds()
    if kind not in kinds:
        raise DinoscopeError(f"unknown dataset kind {kind!r}", field="kind", fix=f"use one of {sorted(kinds)}")
    factory = kinds[kind]
    if not callable(factory) and hasattr(factory, "load"):  # an entry point
        try:
            factory = factory.load()
        except ImportError as err:
            raise DinoscopeError(
                f"the dataset kind {kind!r} could not be imported ({err})",
                field="kind",
                fix=f"install the package that provides {factory.value}",
            ) from None
    params = tuple(getattr(factory, "input_params", ()))
    return params[0] if params else None


def source_specs(kind: str, paths: Sequence[str], params: dict[str, Any]) -> list[dict[str, Any]]:
    """One source per path (given as the kind's path keyword), or one source without a path for a kind that reads
    no files (``synthetic_shapes``)."""
    keyword = path_param(kind)
    if keyword is None:
        if paths:
            raise DinoscopeError(
                f"dataset kind {kind!r} reads no files, but sources were given", field="sources", fix="drop them"
            )
        return [{"kind": kind, "params": dict(params)}]
    if not paths:
        raise DinoscopeError(
            f"dataset kind {kind!r} needs at least one SOURCE", field="sources", fix=f"give its `{keyword}` path(s)"
        )
    if keyword in params:
        raise DinoscopeError(
            f"`{keyword}` is given by the SOURCE arguments", field=f"params.{keyword}", fix="remove it from params"
        )
    return [{"kind": kind, "params": {keyword: str(path), **params}} for path in paths]


def build_sources(specs: Sequence[dict[str, Any]]) -> list[Dataset]:
    """The datasets of ``specs`` (see the module docstring)."""
    return [build_dataset(spec["kind"], **dict(spec.get("params") or {})) for spec in specs]


def item_metadata(dataset: Dataset, index: int) -> dict[str, str | None]:
    """``{path, window, cell}`` of item ``index`` (``None`` where unknown); see the module docstring."""
    if hasattr(dataset, "describe_item"):
        described = dataset.describe_item(index)
        return {key: _text(described.get(key)) for key in ("path", "window", "cell")}
    if hasattr(dataset, "locate"):
        path, window = dataset.locate(index)
        return {"path": str(path), "window": window_text(window), "cell": None}
    files = getattr(dataset, "files", None)
    if isinstance(files, Sequence) and len(files) == len(dataset):
        return {"path": str(files[index]), "window": None, "cell": None}
    if all(hasattr(dataset, name) for name in ("fields", "field_of", "centres")):
        field = dataset.fields[int(dataset.field_of[index])]
        y, x = (float(v) for v in dataset.centres[index])
        return {"path": _text(getattr(field, "path", None)), "window": None, "cell": f"{y:.1f},{x:.1f}"}
    return {"path": None, "window": None, "cell": None}


def window_text(window: Any) -> str | None:
    """A pixel window (an object with ``col_off, row_off, width, height``, or a 4-sequence) as ``"c,r,w,h"``."""
    if window is None:
        return None
    if all(hasattr(window, name) for name in ("col_off", "row_off", "width", "height")):
        window = (window.col_off, window.row_off, window.width, window.height)
    return ",".join(str(int(v)) for v in window)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def image_of(item: Any) -> np.ndarray:
    """The image of a dataset item (labelled datasets return ``(image, label)``)."""
    image = item[0] if isinstance(item, tuple) else item
    image = np.asarray(image)
    return image[..., None] if image.ndim == 2 else image


def thumbnail(image: np.ndarray, side: int = 64) -> np.ndarray:
    """An ``H x W x 3`` float image in [0, 1] for display: the first three channels (grey for one), each stretched
    between its 1st and 99th percentile, subsampled to about ``side`` pixels."""
    image = np.asarray(image, dtype=np.float32)
    step = max(1, max(image.shape[:2]) // side)
    image = image[::step, ::step]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 2:
        image = np.concatenate([image, image[..., :1]], axis=-1)
    image = image[..., :3]
    finite = np.where(np.isfinite(image), image, 0.0)
    low = np.percentile(finite, 1, axis=(0, 1))
    high = np.percentile(finite, 99, axis=(0, 1))
    return np.clip((finite - low) / np.maximum(high - low, 1e-6), 0.0, 1.0)


class CollectionImages:
    """Thumbnails of a collection's items, read from its source datasets (nothing for a ``.npy`` input)."""

    def __init__(self, sources: Sequence[dict[str, Any]] | None, columns: dict[str, np.ndarray]) -> None:
        self.datasets: list[Dataset] | None = None
        if sources:
            try:
                self.datasets = build_sources(sources)
            except DinoscopeError as err:  # a report without pictures is still a report
                log.warning("no thumbnails: the sources cannot be opened again (%s)", err)
        self.source = columns.get("source")
        self.item = columns.get("item")

    @property
    def available(self) -> bool:
        """Whether thumbnails can be drawn."""
        return self.datasets is not None and self.source is not None and self.item is not None

    def thumbnail(self, row: int, side: int = 64) -> np.ndarray:
        """The thumbnail of row ``row`` of the collection."""
        dataset = self.datasets[int(self.source[row])]
        return thumbnail(image_of(dataset[int(self.item[row])]), side)
