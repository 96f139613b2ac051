"""Linear probes on frozen features, a grid of learning rates trained simultaneously (DINOv2 linear evaluation,
Oquab et al. arXiv:2304.07193 Sec. 7; features: class tokens of the last blocks plus the mean patch token)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from core.eval.features import extract

LR_GRID = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


def train_linear_grid(xtr: torch.Tensor, ytr: torch.Tensor, xva: torch.Tensor, yva: torch.Tensor, *,
                      lrs: Sequence[float] = LR_GRID, epochs: int = 100, batch_size: int = 256,
                      seed: int = 0) -> dict[str, Any]:
    """SGD (momentum 0.9) with a cosine schedule for one classifier per lr; returns every accuracy and the best."""
    g = torch.Generator().manual_seed(seed)
    n_cls = int(max(ytr.max(), yva.max())) + 1
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6  # standardising features makes one lr grid fit every backbone
    xtr, xva = (xtr - mean) / std, (xva - mean) / std
    heads = nn.ModuleList(nn.Linear(xtr.shape[1], n_cls) for _ in lrs)
    for h in heads:
        nn.init.normal_(h.weight, std=0.01, generator=g)
        nn.init.zeros_(h.bias)
    scale = batch_size / 256
    opt = torch.optim.SGD([{"params": h.parameters(), "lr": lr * scale} for h, lr in zip(heads, lrs)],
                          momentum=0.9, weight_decay=0.0)
    steps = epochs * max(1, -(-len(ytr) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=0)
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for start in range(0, len(ytr), batch_size):
            idx = perm[start:start + batch_size]
            loss = sum(F.cross_entropy(h(xtr[idx]), ytr[idx]) for h in heads)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        accs = {lr: float((h(xva).argmax(1) == yva).float().mean() * 100) for h, lr in zip(heads, lrs)}
    best = max(accs, key=accs.get)
    return {"top1_per_lr": accs, "best_lr": best, "top1": accs[best]}


def linear_evaluate(backbone: nn.Module, train_set: Dataset, val_set: Dataset, *, size: int = 224,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    n_last_blocks: int = 1, epochs: int = 100, lrs: Sequence[float] = LR_GRID) -> dict[str, Any]:
    xtr, ytr = extract(backbone, train_set, size=size, mean=mean, std=std, n_last_blocks=n_last_blocks,
                       avgpool=True)
    xva, yva = extract(backbone, val_set, size=size, mean=mean, std=std, n_last_blocks=n_last_blocks, avgpool=True)
    result = train_linear_grid(xtr, ytr, xva, yva, lrs=lrs, epochs=epochs)
    return {**result, "n_train": len(ytr), "n_val": len(yva), "features": f"cls(last {n_last_blocks}) + avgpool"}
