"""Feed-forward layers of the ViT blocks: GELU MLP and SwiGLU.

SwiGLU follows Shazeer, "GLU Variants Improve Transformer" (arXiv:2002.05202). The hidden-size rounding and the
``w12``/``w3`` key layout match DINOv2's ``SwiGLUFFNFused`` (facebookresearch/dinov2 ``dinov2/layers/swiglu_ffn.py``),
so ViT-g checkpoints load unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Mlp(nn.Module):
    """``fc2(drop(act(fc1(x))))`` on ``x [..., in_features]``."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., in_features] -> [..., out_features]``."""
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def swiglu_hidden_features(hidden_features: int) -> int:
    """Two thirds of the MLP width (same parameter count as a GELU MLP), rounded up to a multiple of 8."""
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """``w3(silu(a) * b)`` where ``[a, b] = w12(x)`` split in halves; ``x [..., in_features]``."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden = swiglu_hidden_features(hidden_features or in_features)
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., in_features] -> [..., out_features]``."""
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class IdentityFFN(nn.Identity):
    """``ffn_layer="identity"``: a block without a feed-forward branch (accepted for parity with DINOv2)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__()


# Official names: "swiglufused" is an alias of "swiglu" (both are one class upstream).
FFN_LAYERS: dict[str, type[nn.Module]] = {
    "mlp": Mlp,
    "swiglu": SwiGLUFFN,
    "swiglufused": SwiGLUFFN,
    "identity": IdentityFFN,
}
