"""Fair baselines for a pretrained backbone: its random-init twin, fixed statistics read-outs, and kNN on pixels.

A pretrained backbone only means something next to what it replaces. Three kinds of baseline, each usable by every
downstream command because each is an ordinary weights file (safetensors + sidecar) or an ordinary result table:

* :func:`write_random_twin`: the same architecture and metadata at random initialisation. DINOv2 initialises
  LayerScale at 1e-5, which makes every block of an untrained ViT nearly the identity, so its class token hardly
  depends on the input (a degenerate baseline at chance). The twin uses LayerScale 1.0 by default, so each block
  mixes the tokens as a trained network's would, and its class token and patch tokens are input-dependent.
* :func:`write_statistics_backbone`: a ViT whose output tokens are fixed, non-learned statistics of each patch: the
  mean of each input channel over the pixels of each mask (a whole patch and its quadrants, rings around a cell's
  centre, ...). Its blocks are switched off (LayerScale 0, so each block returns its input) and two constant anchor
  dimensions keep the final LayerNorm linear to within 0.1 %, so a head on it is a head on those statistics.
* :func:`knn_comparison`: weighted kNN accuracy of the pretrained backbone, its twin, raw pixels and per-channel
  mean/std on one labelled dataset, with the features each is read by.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.data.datasets import build_dataset
from core.eval.features import EvalTransform, extract
from core.eval.knn import knn_classify
from core.io import write_json
from core.models.vit import VisionTransformer
from core.weights import WeightMeta, load_backbone, save_backbone

ANCHOR = 100.0  # value of the two constant token dimensions that keep LayerNorm linear on small statistics


def write_random_twin(like: str | os.PathLike, out: str | os.PathLike, layerscale: float = 1.0, seed: int = 0) -> Path:
    """Write a randomly initialised backbone with the architecture, channels and normalisation of ``like``."""
    _, meta = load_backbone(like)
    kwargs = {**meta.model_kwargs, "init_values": layerscale}
    torch.manual_seed(seed)
    model = VisionTransformer(**kwargs)
    extra = {k: v for k, v in meta.extra.items() if k == "input_normalisation"}
    twin = WeightMeta(
        arch=meta.arch,
        model_kwargs=kwargs,
        channel_names=list(meta.channel_names),
        mean=list(meta.mean),
        std=list(meta.std),
        source_format="random_init",
        extra={**extra, "baseline": "random_twin", "twin_of": str(like), "layerscale": layerscale, "seed": seed},
    )
    return save_backbone(model, twin, out)


def quadrant_masks(patch: int) -> list[np.ndarray]:
    """The whole ``patch x patch`` square and its four quadrants."""
    half = patch // 2
    masks = [np.ones((patch, patch), bool)]
    for y0 in (0, half):
        for x0 in (0, half):
            mask = np.zeros((patch, patch), bool)
            mask[y0 : y0 + half, x0 : x0 + half] = True
            masks.append(mask)
    return masks


def ring_masks(size: int, edges: Sequence[float]) -> list[np.ndarray]:
    """Rings ``edges[i] <= r < edges[i+1]`` around the centre of a ``size x size`` square."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5 - size / 2
    radius = np.hypot(yy, xx)
    return [(radius >= lo) & (radius < hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def write_statistics_backbone(
    like: str | os.PathLike,
    out: str | os.PathLike,
    masks: str = "quadrants",
    patch_size: int = 0,
    ring_edges: Sequence[float] = (0, 3, 6, 9, 12, 16, 23),
) -> Path:
    """Write a ViT whose tokens hold per-channel means over fixed pixel masks (see the module docstring).

    Args:
        like: backbone whose channels, width, depth and normalisation are copied.
        out: the ``.safetensors`` to write.
        masks: ``quadrants`` (each patch and its 4 quadrants) or ``rings`` (``ring_edges`` around the centre of a
            single patch that covers the whole input; for crops centred on cells).
        patch_size: patch side (0: the one of ``like``).
    """
    _, meta = load_backbone(like)
    patch = patch_size or meta.patch_size
    chosen = quadrant_masks(patch) if masks == "quadrants" else ring_masks(patch, ring_edges)
    c, dim = meta.in_chans, meta.embed_dim
    if c * len(chosen) + 2 > dim:
        raise ValueError(f"{c} channels x {len(chosen)} masks + 2 anchors exceed the width {dim}")
    image = patch if masks == "rings" else int(meta.model_kwargs["img_size"])
    kwargs = {**meta.model_kwargs, "patch_size": patch, "img_size": image, "init_values": 1e-5}
    model = VisionTransformer(**kwargs)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith((".gamma", "pos_embed", "cls_token", "mask_token")) or name.startswith("patch_embed"):
                param.zero_()
        weight = model.patch_embed.proj.weight  # [dim, c, patch, patch]
        for ch in range(c):
            for m, mask in enumerate(chosen):
                weight[ch * len(chosen) + m, ch] = torch.from_numpy(mask / mask.sum()).float()
        model.patch_embed.proj.bias[dim - 2] = ANCHOR
        model.patch_embed.proj.bias[dim - 1] = -ANCHOR
        model.norm.weight.fill_(ANCHOR * (2 / dim) ** 0.5)  # undoes LayerNorm's division by the anchors' spread
        model.norm.bias.zero_()
    stats = WeightMeta(
        arch=meta.arch,
        model_kwargs=kwargs,
        channel_names=list(meta.channel_names),
        mean=list(meta.mean),
        std=list(meta.std),
        source_format="statistics",
        extra={
            "input_normalisation": "fixed",  # absolute intensities: a per-crop z-score would erase the means
            "baseline": f"per-channel means over {masks}",
            "n_masks": len(chosen),
        },
    )
    return save_backbone(model, stats, out)


def _pixels(dataset: Any, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    transform = EvalTransform(dataset, size, None, None)
    images, labels = zip(*(transform[i] for i in range(len(transform))), strict=True)
    return torch.stack(images), torch.tensor(labels)


def _first_per_class(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the first ``n`` examples of every class."""
    return torch.cat([torch.nonzero(labels == c).flatten()[:n] for c in labels.unique()])


def _curve(
    train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], per_class: list[int], k: int
) -> dict:
    n_classes = int(max(train[1].max(), val[1].max())) + 1
    result = {}
    for n in per_class:
        keep = _first_per_class(train[1], n)
        pred = knn_classify(train[0][keep], train[1][keep], val[0], ks=[k], num_classes=n_classes)[k]
        result[str(n)] = float((pred == val[1]).float().mean() * 100)
    return result


def knn_comparison(
    pretrained: str | os.PathLike,
    random_twin: str | os.PathLike,
    out: str | os.PathLike,
    kind: str = "synthetic_scenes",
    train: dict | None = None,
    val: dict | None = None,
    size: int = 32,
    per_class: Sequence[int] = (10, 25, 100, 250),
    k: int = 10,
) -> dict[str, Any]:
    """Weighted kNN top-1 (%) of every method for several numbers of labelled examples per class.

    Features are taken once from the labelled pool ``train`` and the held-out set ``val``; for each count in
    ``per_class`` the first that many examples of every class are the kNN's memory. Rows: each backbone read by its
    class token and by its mean patch token; raw pixels (the image resized to ``size`` and normalised, as one
    vector); per-channel mean and standard deviation. Written to ``out`` (JSON) and returned.
    """
    train_set = build_dataset(kind, **{**(train or {}), "labelled": True})
    val_set = build_dataset(kind, **{**(val or {}), "labelled": True})
    per_class = sorted(int(n) for n in per_class)
    rows = []
    for method, path in (("pretrained", pretrained), ("random init", random_twin)):
        model, meta = load_backbone(path)
        both = [extract(model, d, size=size, mean=meta.mean, std=meta.std, avgpool=True) for d in (train_set, val_set)]
        dim = meta.embed_dim
        for features, cut in (("class token", slice(0, dim)), ("mean patch token", slice(dim, 2 * dim))):
            split = [(x[:, cut], y) for x, y in both]
            rows.append({"method": method, "features": features, "top1": _curve(*split, per_class, k)})
    pix = [_pixels(d, size) for d in (train_set, val_set)]
    flat = [(x.flatten(1), y) for x, y in pix]
    rows.append(
        {
            "method": "raw pixels",
            "features": f"the {size}x{size} image as one vector",
            "top1": _curve(*flat, per_class, k),
        }
    )
    stats = [(torch.cat([x.mean((2, 3)), x.std((2, 3))], 1), y) for x, y in pix]
    rows.append(
        {"method": "channel statistics", "features": "per-channel mean and std", "top1": _curve(*stats, per_class, k)}
    )
    result = {
        "kind": kind,
        "train": dict(train or {}),
        "val": dict(val or {}),
        "size": size,
        "k": k,
        "per_class": per_class,
        "classes": list(getattr(train_set, "classes", [])),
        "n_val": len(val_set),
        "rows": rows,
    }
    write_json(Path(out), result)
    return result


DEMO_CALLS: dict[str, Any] = {
    "random_twin": write_random_twin,
    "statistics_backbone": write_statistics_backbone,
    "knn_comparison": knn_comparison,
}
