"""Feature extraction from a frozen backbone over a labelled dataset (``(H x W x C array, label)`` items)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from core.data.datasets import scale_to_unit
from core.distributed.device import module_device, place, wants_pinned_memory
from core.models.heads import linear_input
from core.weights.meta import default_normalisation


class EvalTransform(Dataset):
    """Resize to ``size`` (bicubic), scale to [0,1] by dtype, normalise per channel; returns ``(C x S x S, label)``."""

    def __init__(
        self,
        dataset: Dataset,
        size: int,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        self_standardise: bool = False,
    ) -> None:
        self.dataset, self.size, self.self_standardise = dataset, size, self_standardise
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[i]
        x = torch.from_numpy(scale_to_unit(np.asarray(image))).permute(2, 0, 1)
        x = F.interpolate(x[None], size=(self.size, self.size), mode="bicubic", align_corners=False)[0]
        if self.self_standardise:
            x = (x - x.mean((1, 2), keepdim=True)) / (x.std((1, 2), unbiased=False, keepdim=True) + 1e-7)
        else:
            c = x.shape[0]
            mean, std = (self.mean, self.std) if self.mean else default_normalisation(c)
            x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        return x, int(label)


@torch.no_grad()
def extract(
    backbone: nn.Module,
    dataset: Dataset,
    *,
    size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 64,
    n_last_blocks: int = 1,
    avgpool: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([n, F] features, [n] labels)``: the class token (``n_last_blocks=1, avgpool=False``) or the linear-probe
    input of DINOv2 (class tokens of the last blocks, plus the mean patch token)."""
    was_training = backbone.training
    backbone.eval()
    device = module_device(backbone)  # features are computed wherever the backbone lives, returned on the CPU
    loader = DataLoader(
        EvalTransform(dataset, size, mean, std), batch_size=batch_size, pin_memory=wants_pinned_memory(device)
    )
    feats, labels = [], []
    for x, y in loader:
        layers = backbone.get_intermediate_layers(place(x, device), n_last_blocks, return_class_token=True)
        feats.append(linear_input(layers, n_last_blocks=n_last_blocks, avgpool=avgpool).float().cpu())
        labels.append(y)
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)
