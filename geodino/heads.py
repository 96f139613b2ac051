"""Canopy-height heads on frozen (or fine-tuned) ViT patch features, and the height-bin arithmetic they share.

Height as classification over bins, then expectation: the "classify" depth head of Bhat et al., "AdaBins"
(CVPR 2021), used by DINOv2's depth heads (Oquab et al., arXiv:2304.07193, section 7.4; facebookresearch/dinov2
``dinov2/hub/depthers.py``: ``BNHead(classify=True, n_bins=256, bins_strategy="UD", norm_strategy="linear")``) and
by HighResCanopyHeight (Tolan et al., Remote Sensing of Environment 300:113888, 2024). Two rules turn the bin
logits ``l`` into a distribution ``p``:

* ``relu_eps`` (HRCH and DINOv2's ``norm_strategy="linear"``): ``w = relu(l) + eps``, ``p = w / sum(w)``;
* ``softmax``: ``p = softmax(l)``.

The height is ``sum(p * bins)`` and its uncertainty the standard deviation of that distribution,
``sqrt(sum(p * bins**2) - height**2)``, both in the bins' unit.

:class:`LinearCanopyHead` is a linear head in the style of DINOv2's linear depth head: the patch tokens of the last
``n`` blocks, each concatenated with its broadcast class token, go through one 1x1 convolution (no BatchNorm, so
cached features and single-chip prediction behave the same) to 256 bins (or to one value for direct regression).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BIN_RULES = ("relu_eps", "softmax")
HEAD_MODES = ("bins", "regression")
Features = Sequence[tuple[Tensor, Tensor]]  # per block: patch tokens [B, D, h, w], class token [B, D]


def height_bins(n_bins: int, min_height: float, max_height: float) -> Tensor:
    """Uniformly spaced bin centres ``[n_bins]`` (DINOv2's ``bins_strategy="UD"``; HRCH: 0.001..10, 256 bins)."""
    return torch.linspace(min_height, max_height, n_bins)


def bin_probabilities(logits: Tensor, rule: str = "relu_eps", eps: float = 0.1) -> Tensor:
    """``logits [B, K, ...] -> p [B, K, ...]`` summing to 1 over dim 1 (see the module docstring)."""
    if rule == "relu_eps":
        weights = torch.relu(logits) + eps
        return weights / weights.sum(dim=1, keepdim=True)
    if rule == "softmax":
        return torch.softmax(logits, dim=1)
    raise ValueError(f"unknown bin rule {rule!r}; use one of {BIN_RULES}")


def bin_moments(logits: Tensor, bins: Tensor, rule: str = "relu_eps", eps: float = 0.1) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of the bin distribution: ``logits [B, K, H, W] -> ([B, H, W], [B, H, W])``.

    One contraction of the unnormalised weights with ``[1, b - c, (b - c)**2]`` gives all three moments; ``c`` is
    the middle of the bin range, which keeps float32 cancellation in the variance small. This avoids materialising
    ``p`` or a ``[B, K, H, W]`` temporary of deviations, the dominant cost at pixel resolution.
    """
    if rule == "relu_eps":
        weights = torch.relu(logits) + eps
    elif rule == "softmax":
        weights = torch.exp(logits - logits.amax(dim=1, keepdim=True))
    else:
        raise ValueError(f"unknown bin rule {rule!r}; use one of {BIN_RULES}")
    bins = bins.to(weights.dtype)
    centre = 0.5 * (bins[0] + bins[-1])
    shifted = bins - centre
    basis = torch.stack([torch.ones_like(shifted), shifted, shifted * shifted])  # 3 x K
    total, first, second = torch.einsum("bkhw,jk->jbhw", weights, basis).unbind(0)
    offset = first / total
    std = torch.sqrt(torch.clamp(second / total - offset * offset, min=0.0))
    return centre + offset, std


def concat_features(features: Features, use_cls_token: bool = True) -> Tensor:
    """``[(patch [B, D, h, w], cls [B, D])] * n -> [B, n * D * (1 + use_cls_token), h, w]``, block by block."""
    parts = []
    for patch, cls in features:
        parts.append(patch)
        if use_cls_token:
            parts.append(cls[:, :, None, None].expand_as(patch))
    return torch.cat(parts, dim=1)


def resize_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (``align_corners=False``) resize of ``[B, H, W]`` maps; a no-op at the same size."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


class LinearCanopyHead(nn.Module):
    """Linear canopy-height head: ``features -> {"height": [B, H, W], "std": [B, H, W]}`` in metres.

    Shapes: ``n_layers`` blocks of patch tokens ``[B, embed_dim, h, w]`` plus class tokens ``[B, embed_dim]`` ->
    1x1 conv -> logits ``[B, n_bins, h, w]`` -> bilinear x``upsample`` (DINOv2's linear depth head uses 4) ->
    bin mean and std -> bilinear to the pixel grid ``out_size``. Bilinear resizing commutes with a 1x1 conv, so
    resizing logits instead of the (wider) features gives the same numbers for less memory.

    Args:
        embed_dim: backbone width D.
        n_layers: how many blocks' outputs are concatenated.
        use_cls_token: concatenate each block's broadcast class token to its patch tokens.
        mode: ``"bins"`` (classification over height bins, with std) or ``"regression"`` (one value, no std).
        n_bins, min_height, max_height: bin centres in metres, ``linspace(min_height, max_height, n_bins)``.
        bin_rule, eps: how logits become bin probabilities (:data:`BIN_RULES`).
        upsample: logits are upsampled by this factor before the expectation.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        n_layers: int = 4,
        use_cls_token: bool = True,
        mode: str = "bins",
        n_bins: int = 256,
        min_height: float = 0.0,
        max_height: float = 60.0,
        bin_rule: str = "relu_eps",
        eps: float = 0.1,
        upsample: int = 4,
    ) -> None:
        super().__init__()
        if mode not in HEAD_MODES:
            raise ValueError(f"unknown head mode {mode!r}; use one of {HEAD_MODES}")
        if bin_rule not in BIN_RULES:
            raise ValueError(f"unknown bin rule {bin_rule!r}; use one of {BIN_RULES}")
        self.mode = mode
        self.use_cls_token = use_cls_token
        self.bin_rule = bin_rule
        self.eps = eps
        self.upsample = upsample
        self.in_channels = embed_dim * n_layers * (2 if use_cls_token else 1)
        self.conv = nn.Conv2d(self.in_channels, n_bins if mode == "bins" else 1, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)
        if mode == "regression":
            # Start at the middle of the height range so early gradients are not dominated by the offset.
            nn.init.constant_(self.conv.bias, 0.5 * (min_height + max_height))
        self.register_buffer("bins", height_bins(n_bins, min_height, max_height), persistent=False)

    @property
    def has_std(self) -> bool:
        """True in ``bins`` mode, where the head also returns the per-pixel std of the bin distribution."""
        return self.mode == "bins"

    def forward(self, features: Features, out_size: tuple[int, int]) -> dict[str, Tensor]:
        """``n_layers`` x ``(patch [B, D, h, w], cls [B, D])`` -> ``{"height", "std"?}`` ``[B, *out_size]`` metres."""
        logits = self.conv(concat_features(features, self.use_cls_token))
        if self.mode == "regression":
            return {"height": resize_maps(logits[:, 0], out_size)}
        if self.upsample > 1:
            logits = F.interpolate(logits, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        mean, std = bin_moments(logits, self.bins, self.bin_rule, self.eps)
        return {"height": resize_maps(mean, out_size), "std": resize_maps(std, out_size)}
