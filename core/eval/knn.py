"""Weighted k-nearest-neighbour classification on frozen features.

Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination" (arXiv:1805.01978), as used
by DINO/DINOv2: cosine similarity of L2-normalised class tokens, the top-``max(k)`` neighbours weighted by
``softmax(sim / T)`` over those neighbours (``T = 0.07``), class scores summed over the first ``k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from core.eval.features import extract


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> dict[int, torch.Tensor]:
    """Predicted labels ``[n_test]`` for every ``k``; memory is bounded by ``chunk x n_train``."""
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    num_classes = num_classes or int(train_labels.max()) + 1
    kmax = min(max(ks), train.shape[0])
    preds: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, test.shape[0], chunk):
        sims, idx = (test[start : start + chunk] @ train.T).topk(kmax, dim=1)
        weights = (sims / temperature).softmax(dim=1)
        onehot = F.one_hot(train_labels[idx], num_classes).float()  # q x kmax x classes
        for k in ks:
            kk = min(k, kmax)
            scores = (weights[:, :kk, None] * onehot[:, :kk]).sum(1)
            preds[k].append(scores.argmax(1))
    return {k: torch.cat(v) for k, v in preds.items()}


def knn_evaluate(
    backbone: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    *,
    ks: Sequence[int] = (10, 20),
    size: int = 224,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    temperature: float = 0.07,
) -> dict[str, Any]:
    """Top-1 accuracy (%) per ``k`` of a frozen backbone's class tokens."""
    xtr, ytr = extract(backbone, train_set, size=size, mean=mean, std=std)
    xva, yva = extract(backbone, val_set, size=size, mean=mean, std=std)
    preds = knn_classify(xtr, ytr, xva, ks=ks, temperature=temperature, num_classes=int(max(ytr.max(), yva.max())) + 1)
    return {
        "top1": {k: float((p == yva).float().mean() * 100) for k, p in preds.items()},
        "n_train": len(ytr),
        "n_val": len(yva),
        "temperature": temperature,
    }
