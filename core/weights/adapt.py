"""Adapt pretrained patch-embedding weights to another number of input channels (e.g. RGB -> N bands).

Strategies for ``W [D, C0, p, p] -> W' [D, n, p, p]``:
    ``repeat``  (default) channel ``i`` takes the filter of source channel ``i mod C0``, and all filters are scaled
                by ``C0 / n``, so an input whose bands share the source statistics gives the same activation scale.
                This is the usual choice for multispectral imagery (as timm's ``adapt_input_conv`` does).
    ``mean``    every new channel takes the mean source filter scaled by ``C0 / n``: no band is privileged.
    ``zero``    the first ``min(C0, n)`` channels keep their filters, extra channels start at zero: the adapted model
                gives exactly the source features on the first channels (useful for RGB + extra bands).
The per-channel normalisation statistics follow the same mapping (``adapt_channel_stats``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.errors import DinoscopeError

CHANNEL_STRATEGIES = ("repeat", "mean", "zero")


def adapt_patch_embed(weight: Tensor, n: int, strategy: str = "repeat") -> Tensor:
    """Patch-embedding weight ``[D, C0, p, p] -> [D, n, p, p]`` by ``strategy`` (see the module docstring); unchanged
    when ``n == C0``.
    """
    if strategy not in CHANNEL_STRATEGIES:
        raise DinoscopeError(
            f"unknown channel strategy {strategy!r}", field="channel_strategy", fix=f"use one of {CHANNEL_STRATEGIES}"
        )
    if n < 1:
        raise DinoscopeError(f"in_chans must be at least 1, got {n}", field="in_chans")
    c0 = weight.shape[1]
    if n == c0:
        return weight
    w = weight.float()
    if strategy == "repeat":
        out = w[:, [i % c0 for i in range(n)]] * (c0 / n)
    elif strategy == "mean":
        out = w.mean(dim=1, keepdim=True).expand(-1, n, -1, -1) * (c0 / n)
    else:
        out = torch.zeros(w.shape[0], n, *w.shape[2:])
        k = min(c0, n)
        out[:, :k] = w[:, :k]
    return out.to(weight.dtype).contiguous()


def adapt_channel_stats(values: list[float], n: int, strategy: str = "repeat") -> list[float]:
    """Map per-channel statistics (mean or std) the same way as the filters."""
    c0 = len(values)
    if n == c0:
        return list(values)
    if strategy == "mean":
        return [sum(values) / c0] * n
    return [values[i % c0] for i in range(n)]
