"""Data of ``dinoscope canopy fit`` (:mod:`geodino.fit`): the (image, CHM) pairs, their spatial-block chip splits,
and the two batch sources the trainer reads: :class:`LiveChips` (images read on the fly) and :class:`FeatureCache`
(frozen-backbone features computed once and memory-mapped from ``RUN/cache``)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap

from core.errors import DinoscopeError
from core.io import write_json
from core.logging import progress
from core.weights.meta import WeightMeta
from geodino.chips import ChipSampler, make_chip_dataset
from geodino.config import CanopyFitRecipe
from geodino.model import CanopyModel
from geodino.normalise import BandNormaliser
from geodino.pretrain_data import expand_raster_paths
from geodino.synthetic import make_forest
from geodino.values import InputRule
from geodino.vrt import write_vrt

log = logging.getLogger(__name__)
Batch = dict[str, Any]


def listed_pairs(recipe: CanopyFitRecipe) -> list[tuple[Path, list[Path]]]:
    """``(image, CHM files)`` for every image the recipe lists: ``data.pairs`` (either side may be a glob or a
    directory) and ``data.images`` with the one ``data.chm``. Several CHM files form one mosaic."""
    specs = [(image, chm, "data.pairs") for image, chm in recipe.data.pairs]
    specs += [(image, recipe.data.chm, "data.images") for image in recipe.data.images]
    listed = []
    for image_spec, chm_spec, field in specs:
        chms = _expand(chm_spec, "data.chm" if field == "data.images" else field)
        listed += [(image, chms) for image in _expand(image_spec, field)]
    return listed


def _expand(spec: str, field: str) -> list[Path]:
    try:
        return expand_raster_paths(spec)
    except DinoscopeError as err:
        raise DinoscopeError(err.message, path=spec, field=field, fix=err.fix) from None


def chm_mosaic(chms: list[Path], run_dir: Path) -> Path:
    """One CHM file as it is; several as a VRT mosaic in ``RUN/chm`` (named after its members' paths, sizes and
    times, so the feature cache sees a changed member as a new target)."""
    if len(chms) == 1:
        return chms[0]
    ident = json.dumps([[str(p.resolve()), *file_id(p)[1:]] for p in chms])
    vrt = run_dir / "chm" / f"chm_{hashlib.sha256(ident.encode()).hexdigest()[:12]}.vrt"
    if not vrt.exists():
        vrt.parent.mkdir(parents=True, exist_ok=True)
        write_vrt(chms, vrt)
    return vrt


def training_pairs(recipe: CanopyFitRecipe, run_dir: Path) -> list[tuple[Path, Path]]:
    """The recipe's (image, CHM) pairs (globs expanded, CHM tiles mosaicked) plus any synthetic forests it asks for
    (written once, then reused)."""
    pairs = [(image, chm_mosaic(chms, run_dir)) for image, chms in listed_pairs(recipe)]
    syn = recipe.data.synthetic
    out = run_dir / "synthetic" / f"{syn.size}px_{syn.res:g}m"
    for seed in range(syn.seed, syn.seed + syn.scenes):
        rgb, chm = out / f"forest_seed{seed}_rgb.tif", out / f"forest_seed{seed}_chm.tif"
        if not (rgb.exists() and chm.exists()):
            rgb, chm = make_forest(out, size=syn.size, seed=seed, res=syn.res)
        pairs.append((rgb, chm))
    return pairs


def file_id(path: Path) -> list[Any]:
    """Name, size and modification time: identifies a file's content for the cache, wherever it was copied."""
    stat = path.stat()
    return [path.name, stat.st_size, stat.st_mtime_ns]


def chip_splits(
    recipe: CanopyFitRecipe,
    pairs: list[tuple[Path, Path]],
    bands: list[int | str] | None,
    meta: WeightMeta,
    convert: InputRule | None = None,
) -> dict[str, ChipSampler]:
    """Train and validation chip samplers over ``pairs`` with spatial-block splits (:func:`make_chip_dataset`).

    The normaliser is the backbone's ``meta`` mean/std (``normalise: weights_meta``), or scene-level percentiles
    computed by the train split and shared with validation, so both see identical scaling. ``convert`` (the fit's
    input rule, :mod:`geodino.values`) is applied to every image read.
    """
    d = recipe.data
    normaliser = None  # percentiles: computed by the train split from the images, then shared with val
    if d.normalise == "weights_meta":
        normaliser = BandNormaliser.from_weights_meta(meta.mean, meta.std, d.dtype_max)
    common: dict[str, Any] = {
        "stride": d.stride or None,
        "block_size": d.block_size or None,
        "val_fraction": d.val_fraction,
        "seed": d.split_seed,
        "max_nodata_fraction": d.max_nodata_fraction,
        "bands": bands,
        "resampling": d.resampling,
        "convert": convert,
    }
    train = make_chip_dataset(pairs, d.chip_size, split="train", normaliser=normaliser, **common)
    val = make_chip_dataset(pairs, d.chip_size, split="val", normaliser=train.normaliser, **common)
    return {"train": train, "val": val}


class LiveChips:
    """Chips read on the fly (fine-tuning, or a frozen backbone without cache): batches of images."""

    def __init__(self, chips: ChipSampler, num_workers: int = 0) -> None:
        self.chips = chips
        self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.chips)

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """Batches ``{"image" [B, C, S, S], "target" [B, S, S] metres, "valid" [B, S, S]}`` of ``S``-pixel chips."""
        loader = torch.utils.data.DataLoader(
            self.chips, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=self.num_workers
        )
        for image, target, valid in loader:
            yield {"image": image, "target": target, "valid": valid}

    def target_mean(self) -> float:
        """Mean target height in metres over all valid pixels (one pass over the chips)."""
        total, count = 0.0, 0
        for batch in self.batches(64):
            total += float(batch["target"][batch["valid"]].double().sum())
            count += int(batch["valid"].sum())
        return total / max(count, 1)


class FeatureCache:
    """Frozen-backbone features of one chip split, computed once into ``directory`` and memory-mapped.

    Files: ``patches.npy`` float16 ``[N, L, D, h, w]``, ``cls.npy`` float16 ``[N, L, D]``, ``target.npy`` float32
    ``[N, S, S]``, ``valid.npy`` bool ``[N, S, S]``; ``key.json`` (written last) says what they were computed from.
    """

    def __init__(
        self,
        directory: Path,
        chips: ChipSampler,
        model: CanopyModel,
        key: dict[str, Any],
        batch_size: int,
        show_progress: bool = True,
    ) -> None:
        self.dir = directory
        size = chips.chip_size
        self.padded = size + (-size % model.pad_multiple)
        full_key = {**key, "chips": chips.chips, "chip_size": size, "normaliser": chips.normaliser.to_dict()}
        digest = hashlib.sha256(json.dumps(full_key, sort_keys=True, default=str).encode()).hexdigest()
        key_file = directory / "key.json"
        stored = json.loads(key_file.read_text()) if key_file.exists() else {}
        if stored.get("digest") != digest:
            key_file.unlink(missing_ok=True)
            self._build(chips, model, batch_size, digest, show_progress)
        else:
            log.info("reusing cached features in %s", directory)
        self.mean = float(json.loads(key_file.read_text())["target_mean"])
        self.arrays = {
            name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in ("patches", "cls", "target", "valid")
        }

    def __len__(self) -> int:
        return int(self.arrays["target"].shape[0])

    def target_mean(self) -> float:
        """Mean target height in metres over all valid pixels, recorded when the cache was built."""
        return self.mean

    def _build(self, chips: ChipSampler, model: CanopyModel, batch_size: int, digest: str, show_progress: bool) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        n, size, pad = len(chips), chips.chip_size, self.padded - chips.chip_size
        device = next(model.parameters()).device
        loader = torch.utils.data.DataLoader(chips, batch_size=batch_size, shuffle=False)
        arrays: dict[str, np.ndarray] = {}
        total, count, start = 0.0, 0, 0
        for image, target, valid in progress(
            loader,
            total=len(loader),
            desc=f"features {chips.split}",
            unit="batch",
            disable=None if show_progress else True,
        ):
            with torch.inference_mode():
                features = model.net.features(torch.nn.functional.pad(image, (0, pad, 0, pad)).to(device))
            patches = torch.stack([p for p, _ in features], 1).half().cpu().numpy()
            cls = torch.stack([c for _, c in features], 1).half().cpu().numpy()
            if not arrays:
                shapes = {
                    "patches": (patches.shape[1:], np.float16),
                    "cls": (cls.shape[1:], np.float16),
                    "target": ((size, size), np.float32),
                    "valid": ((size, size), np.bool_),
                }
                arrays = {
                    k: open_memmap(self.dir / f"{k}.npy", mode="w+", dtype=dt, shape=(n, *shape))
                    for k, (shape, dt) in shapes.items()
                }
            stop = start + len(image)
            for name, value in (
                ("patches", patches),
                ("cls", cls),
                ("target", target.numpy()),
                ("valid", valid.numpy()),
            ):
                arrays[name][start:stop] = value
            total += float(target[valid].double().sum())
            count += int(valid.sum())
            start = stop
        for array in arrays.values():
            array.flush()
        del arrays
        write_json(self.dir / "key.json", {"digest": digest, "target_mean": total / max(count, 1), "n": n})

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[Batch]:
        """Batches ``{"features": [(patch [B, D, h, w], cls [B, D])] per layer, "padded": (P, P), "target",
        "valid"}`` read from the memory maps as float32."""
        n = len(self)
        order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
        a = self.arrays
        for i in range(0, n, batch_size):
            idx = np.sort(order[i : i + batch_size])  # sorted reads are sequential on the memory map
            patches = torch.from_numpy(np.ascontiguousarray(a["patches"][idx])).float()
            cls = torch.from_numpy(np.ascontiguousarray(a["cls"][idx])).float()
            features = [(patches[:, k], cls[:, k]) for k in range(patches.shape[1])]
            yield {
                "features": features,
                "padded": (self.padded, self.padded),
                "target": torch.from_numpy(a["target"][idx]),
                "valid": torch.from_numpy(a["valid"][idx]),
            }
