"""``dinoscope curate embed``: embed a whole collection with a frozen backbone, resumably and over ranks.

    dinoscope curate embed photos/ --weights backbone.safetensors --out runs/pool
    dinoscope curate embed scenes/*.tif --kind geotiff --params window_size=224 length=100000 --weights w --out RUN
    torchrun --nproc_per_node=8 -m core.cli curate embed plates/*.ome.zarr --kind cells --weights w --out RUN

The collection is one dataset per SOURCE of any registered dataset kind (:mod:`core.curate.sources`); item ids run
over the sources in order. Each image is scaled to [0, 1] by dtype, resized to the model's input side (bicubic) and
normalised with the weights' per-channel statistics; the embedding is the class token (with ``avgpool``, also the
mean patch token), as in DINOv2's curation, which embedded the pool with a ViT-H (Oquab et al. 2023, section 3).
The store, resume and rank sharding are in :mod:`core.curate.store`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from core.curate.sources import build_sources, image_of, item_metadata
from core.curate.store import (
    SUMMARY,
    TEXT_COLUMNS,
    PartWriter,
    all_commits,
    merge_parts,
    plan_run,
    start_over,
    wait_for_all,
)
from core.data.datasets import scale_to_unit
from core.distributed.device import place, resolve_device
from core.distributed.env import init_distributed
from core.distributed.layout import DistEnv
from core.errors import DinoscopeError
from core.io import write_json
from core.lock import OutputLock
from core.logging import JsonlLogger, progress
from core.models.heads import linear_input
from core.weights import load_backbone
from core.weights.meta import default_normalisation

log = logging.getLogger(__name__)


class PreparedItems(Dataset):
    """Rows ``rows`` of a collection as ``(C x S x S normalised tensor, id, path, window, cell)``."""

    def __init__(
        self, datasets: Sequence[Dataset], rows: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.datasets, self.rows, self.size = list(datasets), rows, size
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets])
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.rows)

    def locate(self, row: int) -> tuple[int, int]:
        """``(source, item)`` of collection row ``row``."""
        source = int(np.searchsorted(self.offsets, row, side="right") - 1)
        return source, int(row - self.offsets[source])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str, str, str]:
        row = int(self.rows[index])
        source, item = self.locate(row)
        dataset = self.datasets[source]
        image = torch.from_numpy(scale_to_unit(image_of(dataset[item]))).permute(2, 0, 1)
        if image.shape[0] != len(self.mean):
            raise DinoscopeError(
                f"item {row} has {image.shape[0]} channels, the backbone takes {len(self.mean)}",
                field="weights",
                fix="use weights made for these channels (`dinoscope weights convert --in-chans N`)",
            )
        image = F.interpolate(image[None], size=(self.size, self.size), mode="bicubic", align_corners=False)[0]
        meta = item_metadata(dataset, item)
        return (image - self.mean) / self.std, row, *(meta[k] or "" for k in TEXT_COLUMNS)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 * 2**20):
            digest.update(block)
    return digest.hexdigest()


def _decide(run: Path, settings: dict[str, Any], env: DistEnv, lock: OutputLock, resume: bool, overwrite: bool) -> str:
    """Rank 0 locks, plans and (re)starts the run; every rank learns its decision (``start``, ``resume``,
    ``complete``) or its error."""
    decision: list[Any] = ["error", "another rank could not start"]
    if env.is_main:
        try:
            lock.acquire()
            action = plan_run(run, settings, resume=resume, overwrite=overwrite)
            if action == "start":
                start_over(run, settings)
            decision = [action, ""]
        except DinoscopeError as err:
            decision = ["error", str(err)]
            if not env.is_distributed:
                raise
    else:
        lock.acquire()
    if env.is_distributed:
        dist.broadcast_object_list(decision, src=0)
    if decision[0] == "error":
        raise DinoscopeError(f"rank 0 could not start the run: {decision[1]}", path=run)
    return decision[0]


@torch.no_grad()
def embed_collection(
    sources: Sequence[dict[str, Any]],
    out_dir: str | Path,
    *,
    weights: str | Path,
    size: int = 0,
    batch_size: int = 64,
    chunk: int = 1024,
    avgpool: bool = False,
    dtype: str = "float32",
    device: str = "auto",
    num_workers: int = 0,
    resume: bool = True,
    overwrite: bool = False,
    poll_seconds: float = 1.0,
) -> dict[str, Any]:
    """Embed every item of ``sources`` (``[{kind, params}]``) into ``out_dir``; see the module docstring.

    Returns:
        the run summary (also ``out_dir/embed_summary.json``); on ranks other than 0, what this rank did.
    """
    env = DistEnv.from_environ()
    if env.is_distributed:
        init_distributed()
    run = Path(out_dir)
    datasets = build_sources(sources)
    n_items = int(sum(len(d) for d in datasets))
    if not n_items:
        raise DinoscopeError("the sources hold no item", field="sources", fix="check the SOURCE paths and params")
    model, meta = load_backbone(weights)
    size = size or int(meta.model_kwargs.get("img_size", 224))
    if size % meta.patch_size:
        raise DinoscopeError(
            f"size {size} is not a multiple of the backbone's patch size {meta.patch_size}",
            field="size",
            fix=f"use a multiple of {meta.patch_size}",
        )
    mean, std = (meta.mean, meta.std) if meta.mean else default_normalisation(meta.in_chans)
    target = resolve_device(device, local_rank=env.local_rank, field="device")
    model = model.to(target).eval()
    settings = json.loads(
        json.dumps(
            {
                "sources": list(sources),
                "weights": file_sha256(weights),
                "size": size,
                "avgpool": avgpool,
                "dtype": dtype,
                "chunk": chunk,
                "n_items": n_items,
            },
            default=str,
        )
    )
    rank_lock = run / f"rank-{env.rank:04d}"
    lock = OutputLock(run, "embedding run", is_dir=True) if env.is_main else OutputLock(rank_lock, is_dir=False)
    try:
        action = _decide(run, settings, env, lock, resume, overwrite)
        if action == "complete":
            log.info("%s is complete with these settings: nothing to do (--no-resume embeds again)", run)
            return json.loads((run / SUMMARY).read_text()) if env.is_main else {"rank": env.rank}
        n_chunks = -(-n_items // chunk)
        done = set(all_commits(run))
        mine = [c for c in range(n_chunks) if c % env.world_size == env.rank and c not in done]
        if done and env.is_main:
            log.info("resuming %s: %d of %d chunks were embedded before", run, len(done), n_chunks)
        part = PartWriter(run / "parts" / f"rank-{env.rank:04d}")
        logger = JsonlLogger(run / "embed_log.jsonl")
        started = time.perf_counter()
        for index in progress(mine, total=len(mine), desc=f"embed (rank {env.rank})", unit="chunk"):
            t0 = time.perf_counter()
            rows = np.arange(index * chunk, min(n_items, (index + 1) * chunk))
            loader = DataLoader(
                PreparedItems(datasets, rows, size, mean, std), batch_size=batch_size, num_workers=num_workers
            )
            features, ids, texts = [], [], {k: [] for k in TEXT_COLUMNS}
            for images, batch_ids, *batch_texts in loader:
                layers = model.get_intermediate_layers(place(images, target), 1, return_class_token=True)
                features.append(linear_input(layers, n_last_blocks=1, avgpool=avgpool).float().cpu().numpy())
                ids.append(batch_ids.numpy())
                for key, values in zip(TEXT_COLUMNS, batch_texts, strict=True):
                    texts[key] += list(values)
            located = [loader.dataset.locate(int(r)) for r in rows]
            part.append(
                index,
                {
                    "embeddings": np.concatenate(features).astype(dtype),
                    "id": np.concatenate(ids).astype(np.int64),
                    "source": np.asarray([s for s, _ in located], np.int64),
                    "item": np.asarray([i for _, i in located], np.int64),
                    **{k: np.asarray(v, dtype=str) for k, v in texts.items()},
                },
                time.perf_counter() - t0,
            )
            logger.log(rank=env.rank, chunk=index, n=len(rows), seconds=time.perf_counter() - t0)
        if not env.is_main:
            return {"rank": env.rank, "chunks": len(mine)}
        commits = wait_for_all(run, n_chunks, poll_seconds, env.world_size)
        dim = _dim(commits)
        attrs = {"format": "dinoscope.curate.embed/1", "weights": str(weights), **settings}
        merge_parts(run, commits, n_items=n_items, dim=dim, dtype=dtype, attrs=attrs, sources=settings["sources"])
        shutil.rmtree(run / "parts", ignore_errors=True)
        summary = {
            "run": str(run),
            "n_items": n_items,
            "dim": dim,
            "dtype": dtype,
            "sources": len(sources),
            "seconds_this_call": round(time.perf_counter() - started, 3),
            "world_size": env.world_size,
        }
        write_json(run / SUMMARY, summary)
        log.info("embedded %d items into %s (D=%d)", n_items, run, dim)
        return summary
    finally:
        lock.release()


def _dim(commits: dict[int, tuple[Path, dict[str, Any]]]) -> int:
    part, record = commits[min(commits)]
    with np.load(part / record["rows"]) as stored:
        return int(stored["embeddings"].shape[1])
