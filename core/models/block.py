"""Pre-norm transformer block with LayerScale and (efficient) stochastic depth.

LayerScale: Touvron et al., "Going deeper with Image Transformers" (CaiT, arXiv:2103.17239).
Stochastic depth: Huang et al. (arXiv:1603.09382). The "efficient" batch-subset variant, which computes a residual
branch only for the kept samples and rescales it, is the one DINOv2 uses for drop rates above 0.1
(Oquab et al., arXiv:2304.07193, "Efficient implementation").

Packed token sets: a block also accepts several token sets at once (e.g. the global and the local crops of DINOv2
pretraining, which the official code feeds to the backbone as one list), packed as rows ``[sum_i B_i * N_i, D]``
with ``seq_shapes = [(B_i, N_i), ...]``. Every per-token module (LayerNorm, Linear, MLP, LayerScale) then runs once
over all rows and only attention is split per set, so each parameter is used (and, under ZeRO-3, gathered) once per
block instead of once per set. Stochastic depth is drawn per set and per sample, as if the sets came one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from core.models.attention import Attention
from core.models.ffn import Mlp

SeqShapes = Sequence[tuple[int, int]]


def pack_tokens(xs: Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
    """``[x_i [B_i, N_i, D]]`` -> ``(rows [sum_i B_i * N_i, D], [(B_i, N_i)])``, sets and samples in order."""
    shapes = [(int(t.shape[0]), int(t.shape[1])) for t in xs]
    return torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]), shapes


def unpack_tokens(rows: Tensor, seq_shapes: SeqShapes) -> list[Tensor]:
    """Inverse of :func:`pack_tokens`; the parts are views of ``rows`` (row ranges of it)."""
    parts = rows.split([b * n for b, n in seq_shapes])
    return [t.reshape(b, n, rows.shape[-1]) for t, (b, n) in zip(parts, seq_shapes, strict=True)]


class LayerScale(nn.Module):
    """Per-channel learnable scale ``x * gamma`` with ``gamma [D]`` initialised to ``init_values``."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def reset_parameters(self) -> None:
        """Set ``gamma`` back to ``init_values``."""
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., D] -> x * gamma`` (same shape)."""
        return x * self.gamma


class DropPath(nn.Module):
    """Per-sample stochastic depth: zero a sample's branch with probability ``drop_prob`` and rescale the rest."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor, seq_shapes: SeqShapes | None = None) -> Tensor:
        """``x [B, ...]``, or packed rows ``[sum_i B_i * N_i, D]`` with ``seq_shapes`` (one draw per sample)."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        if seq_shapes is None:
            mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        else:
            # One draw per sample of each set, in set order, then spread over that sample's token rows.
            mask = torch.cat([x.new_empty((b, 1)).bernoulli_(keep).repeat_interleave(n, dim=0) for b, n in seq_shapes])
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


def add_residual_on_subsets(
    x: Tensor, seq_shapes: SeqShapes, branch: Callable[[Tensor, SeqShapes], Tensor], drop_rate: float
) -> Tensor:
    """:func:`add_residual_on_subset` applied to each packed token set, with one ``branch`` call for all of them.

    ``x [sum_i B_i * N_i, D]`` holds the sets of ``seq_shapes [(B_i, N_i)]``. Set ``i`` keeps
    ``max(int(B_i * (1 - drop_rate)), 1)`` random samples (one ``randperm`` per set, in set order, so a single set
    draws exactly what the unpacked function draws); the kept samples' rows of all sets go through
    ``branch(rows, kept_shapes)`` at once and their residuals are added with the set's own ``B_i / kept_i`` scale.
    """
    rows, kept_shapes, alphas = [], [], []
    offset = 0
    for b, n in seq_shapes:
        kept = max(int(b * (1.0 - drop_rate)), 1)
        idx = torch.randperm(b, device=x.device)[:kept]
        # Token rows of the kept samples, sample-major, so they form a [kept, n, D] block.
        rows.append((offset + idx.unsqueeze(1) * n + torch.arange(n, device=x.device)).flatten())
        kept_shapes.append((kept, n))
        alphas.append(b / kept)
        offset += b * n
    residual = branch(x[torch.cat(rows)], kept_shapes).to(x.dtype)
    # index_add_ on a fresh copy: the same "x + alpha * residual" arithmetic as the unpacked function, per set.
    out = x.clone()
    for r, res, alpha in zip(rows, residual.split([len(r) for r in rows]), alphas, strict=True):
        out.index_add_(0, r, res, alpha=alpha)
    return out


class Block(nn.Module):
    """``x + ls1(attn(norm1(x)))`` then ``x + ls2(ffn(norm2(x)))``.

    Input: ``x [B, N, D]``; a list of ``[B_i, N_i, D]`` (returns a list); or packed rows ``[sum_i B_i * N_i, D]``
    with ``seq_shapes`` (returns packed rows, the layout :class:`~core.models.vit.VisionTransformer` keeps between
    blocks so it packs only once per forward).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path: float = 0.0,
        init_values: float | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        ffn_layer: type[nn.Module] = Mlp,
        attn_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, backend=attn_backend)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ffn_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path_rate = drop_path
        self.drop_path = DropPath(drop_path)

    def _attn_branch(self, x: Tensor, seq_shapes: SeqShapes | None = None) -> Tensor:
        return self.ls1(self.attn(self.norm1(x), seq_shapes=seq_shapes))

    def _ffn_branch(self, x: Tensor, seq_shapes: SeqShapes | None = None) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))  # per token: the packing does not matter

    def forward(self, x: Tensor | Sequence[Tensor], seq_shapes: SeqShapes | None = None) -> Tensor | list[Tensor]:
        """``x [B, N, D] -> [B, N, D]``; a list of ``[B_i, N_i, D]`` -> list (packed inside, so each sub-module runs
        once); packed rows ``[sum_i B_i * N_i, D]`` with ``seq_shapes`` -> packed rows.
        """
        if isinstance(x, (list, tuple)):
            rows, shapes = pack_tokens(x)
            return unpack_tokens(self._forward(rows, shapes), shapes)
        return self._forward(x, seq_shapes)

    def _forward(self, x: Tensor, seq_shapes: SeqShapes | None) -> Tensor:
        rate = self.drop_path_rate
        if self.training and rate > 0.1:
            if seq_shapes is None:
                x = add_residual_on_subset(x, self._attn_branch, rate)
                return add_residual_on_subset(x, self._ffn_branch, rate)
            x = add_residual_on_subsets(x, seq_shapes, self._attn_branch, rate)
            return add_residual_on_subsets(x, seq_shapes, self._ffn_branch, rate)
        if self.training and rate > 0.0:
            x = x + self.drop_path(self._attn_branch(x, seq_shapes), seq_shapes)
            return x + self.drop_path(self._ffn_branch(x, seq_shapes), seq_shapes)
        x = x + self._attn_branch(x, seq_shapes)
        return x + self._ffn_branch(x, seq_shapes)
