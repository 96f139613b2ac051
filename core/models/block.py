"""Pre-norm transformer block with LayerScale and (efficient) stochastic depth.

LayerScale: Touvron et al., "Going deeper with Image Transformers" (CaiT, arXiv:2103.17239).
Stochastic depth: Huang et al. (arXiv:1603.09382). The "efficient" batch-subset variant, which computes a residual
branch only for the kept samples and rescales it, is the one DINOv2 uses for drop rates above 0.1
(Oquab et al., arXiv:2304.07193, "Efficient implementation").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from core.models.attention import Attention
from core.models.ffn import Mlp


class LayerScale(nn.Module):
    """Per-channel learnable scale ``x * gamma`` with ``gamma [D]`` initialised to ``init_values``."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Per-sample stochastic depth: zero a sample's branch with probability ``drop_prob`` and rescale the rest."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def add_residual_on_subset(x: Tensor, branch: Callable[[Tensor], Tensor], drop_rate: float) -> Tensor:
    """Efficient stochastic depth: run ``branch`` on a random subset of the batch only.

    ``x [B, N, D]``; keeps ``max(int(B * (1 - drop_rate)), 1)`` samples, adds their residual scaled by
    ``B / kept`` so the expectation matches the full residual, and leaves the other samples unchanged.
    """
    b = x.shape[0]
    kept = max(int(b * (1.0 - drop_rate)), 1)
    idx = torch.randperm(b, device=x.device)[:kept]
    residual = branch(x[idx])
    out = torch.index_add(x.flatten(1), 0, idx, residual.flatten(1).to(x.dtype), alpha=b / kept)
    return out.view_as(x)


class Block(nn.Module):
    """``x + ls1(attn(norm1(x)))`` then ``x + ls2(ffn(norm2(x)))`` on ``x [B, N, D]``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, drop_path: float = 0.0,
                 init_values: float | None = None, act_layer: type[nn.Module] = nn.GELU,
                 ffn_layer: type[nn.Module] = Mlp, attn_backend: str = "auto") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
                              backend=attn_backend)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ffn_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                             bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path_rate = drop_path
        self.drop_path = DropPath(drop_path)

    def _attn_branch(self, x: Tensor) -> Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def _ffn_branch(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor) -> Tensor:
        rate = self.drop_path_rate
        if self.training and rate > 0.1:
            x = add_residual_on_subset(x, self._attn_branch, rate)
            return add_residual_on_subset(x, self._ffn_branch, rate)
        if self.training and rate > 0.0:
            x = x + self.drop_path(self._attn_branch(x))
            return x + self.drop_path(self._ffn_branch(x))
        x = x + self._attn_branch(x)
        return x + self._ffn_branch(x)
