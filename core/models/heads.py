"""Projection and probe heads.

``DINOHead``: the DINO/iBOT projection head (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", arXiv:2104.14294; DINOv2 arXiv:2304.07193): MLP -> L2 normalisation -> weight-normalised linear layer
(Salimans & Kingma, arXiv:1602.07868). Parameter names match the official checkpoints (``mlp.{i}``,
``last_layer.weight_g``, ``last_layer.weight_v``).

``LinearHead``: the linear probe of DINOv2's linear evaluation (class tokens of the last blocks, optionally with
the average patch token), for classification or regression.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight ``g * v / ||v||`` (row norms); keys ``weight_g [out, 1]``,
    ``weight_v [out, in]`` as saved by ``torch.nn.utils.weight_norm`` with ``dim=0``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        ref = nn.Linear(in_features, out_features, bias=False)  # default (Kaiming-uniform) init, as upstream
        self.weight_v = nn.Parameter(ref.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    @property
    def weight(self) -> Tensor:
        """Effective weight ``[out, in]``: ``g * v / ||v||`` with the row norms of ``v``."""
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., in] -> [..., out]`` (no bias)."""
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """``x [..., in_dim] -> [..., out_dim]`` prototype scores."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim, bias=mlp_bias)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=mlp_bias)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim, bias=mlp_bias))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=mlp_bias))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., in_dim]`` -> MLP -> L2-normalised ``[..., bottleneck_dim]`` -> ``[..., out_dim]``."""
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)


def linear_input(intermediate: Sequence[tuple[Tensor, Tensor]], n_last_blocks: int = 1, avgpool: bool = True) -> Tensor:
    """Probe features from ``get_intermediate_layers(..., return_class_token=True)`` outputs.

    Concatenates the class tokens of the last ``n_last_blocks`` blocks and, with ``avgpool``, the mean patch token
    of the last block: ``[B, (n + avgpool) * D]``. For bag-of-channels outputs (patches ``[B, C, N, D]``) the mean is
    taken per channel and flattened in channel order, as in Cell-DINO's linear evaluation.
    """
    blocks = list(intermediate)[-n_last_blocks:]
    parts = [cls for _, cls in blocks]
    if avgpool:
        patches = blocks[-1][0]
        parts.append(patches.mean(dim=-2).flatten(1))
    return torch.cat(parts, dim=-1).float()


class LinearHead(nn.Module):
    """Linear probe ``[B, in_dim] -> [B, out_dim]`` (logits or regression targets); init N(0, 0.01), bias 0."""

    def __init__(self, in_dim: int, out_dim: int, n_last_blocks: int = 1, avgpool: bool = True) -> None:
        super().__init__()
        self.n_last_blocks = n_last_blocks
        self.avgpool = avgpool
        self.linear = nn.Linear(in_dim, out_dim)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: Tensor | Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        """Features ``[B, in_dim]`` (or block outputs, turned into them by :func:`linear_input`) -> ``[B, out_dim]``."""
        if not isinstance(features, Tensor):
            features = linear_input(features, self.n_last_blocks, self.avgpool)
        return self.linear(features)
