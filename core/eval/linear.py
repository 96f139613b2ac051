"""Linear probes on frozen features over a grid of learning rates (DINOv2 linear evaluation, Oquab et al.
arXiv:2304.07193 Sec. 7; features: class tokens of the last blocks plus the mean patch token)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from core.distributed.device import module_device, place
from core.eval.features import extract
from core.models.heads import LinearHead
from core.train.supervised import SupervisedConfig, TensorSource, train_supervised

LR_GRID = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


def train_linear_grid(
    xtr: torch.Tensor,
    ytr: torch.Tensor,
    xva: torch.Tensor,
    yva: torch.Tensor,
    *,
    lrs: Sequence[float] = LR_GRID,
    epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
    show_progress: bool = False,
) -> dict[str, Any]:
    """SGD (momentum 0.9, lr scaled by ``batch_size / 256``) with a cosine schedule, one classifier per lr, each from
    the same seeded init; every lr keeps its last epoch (as DINOv2 does) and the best validation top-1 wins."""
    n_cls = int(max(ytr.max(), yva.max())) + 1
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6  # standardising features makes one lr grid fit every backbone
    train, val = TensorSource((xtr - mean) / std, ytr), TensorSource((xva - mean) / std, yva)
    scale = batch_size / 256  # DINOv2's linear rule: lrs are quoted for batches of 256

    def loss(head: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(head(x), y)

    def top1(head: nn.Module, source: TensorSource) -> dict[str, float]:
        x, y = place((source.x, source.y), module_device(head))
        return {"top1": float((head(x).argmax(1) == y).float().mean() * 100)}

    cfg = SupervisedConfig(
        lrs=[lr * scale for lr in lrs],
        epochs=epochs,
        batch_size=batch_size,
        optimizer="sgd",
        momentum=0.9,
        schedule="cosine",
        restore_best=False,
        select="top1",
        mode="max",
        seed=seed,
    )
    result = train_supervised(
        lambda: LinearHead(xtr.shape[1], n_cls),
        train,
        loss,
        cfg,
        val=val,
        metric_fn=top1,
        device=device,
        desc="linear probe",
        show_progress=show_progress,
    )
    accs = {lr: run["metric"] for lr, run in zip(lrs, result.per_lr, strict=True)}
    best = max(accs, key=accs.get)  # the first of equal accuracies, as the trainer chose
    return {"top1_per_lr": accs, "best_lr": best, "top1": accs[best]}


def linear_evaluate(
    backbone: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    *,
    size: int = 224,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    n_last_blocks: int = 1,
    epochs: int = 100,
    lrs: Sequence[float] = LR_GRID,
) -> dict[str, Any]:
    """DINOv2 linear evaluation of a frozen ``backbone`` (Oquab et al. 2023, Sec. 7).

    Features of both sets (images resized to ``size``): class tokens of the last ``n_last_blocks`` blocks plus the
    mean patch token, ``[n, (n_last_blocks + 1) * D]``; then :func:`train_linear_grid` over ``lrs``. Returns its
    result (``top1``, ``best_lr``, ``top1_per_lr``) with ``n_train``, ``n_val`` and ``features``.
    """
    xtr, ytr = extract(backbone, train_set, size=size, mean=mean, std=std, n_last_blocks=n_last_blocks, avgpool=True)
    xva, yva = extract(backbone, val_set, size=size, mean=mean, std=std, n_last_blocks=n_last_blocks, avgpool=True)
    # The probes train where the backbone lives (features come back on the CPU).
    result = train_linear_grid(
        xtr, ytr, xva, yva, lrs=lrs, epochs=epochs, device=module_device(backbone), show_progress=True
    )
    return {**result, "n_train": len(ytr), "n_val": len(yva), "features": f"cls(last {n_last_blocks}) + avgpool"}
