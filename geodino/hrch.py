"""Meta's HighResCanopyHeight (HRCH) model: its DPT decode head, the full model, and a strict checkpoint loader.

Re-implemented from the description of the official code (facebookresearch/HighResCanopyHeight @8497139,
``models/dpt_head.py``, ``inference.py``; Tolan et al., "Very high resolution canopy height maps from RGB imagery
using self-supervised vision transformer and convolutional decoder trained on aerial lidar", Remote Sensing of
Environment 300:113888, 2024). The DPT decoder itself is Ranftl et al., "Vision Transformers for Dense
Prediction" (ICCV 2021), in its mmsegmentation form. Module names reproduce the official ``decode_head.*`` keys,
so a real checkpoint loads strictly; ``tests/data/hrch_reference/README.md`` section 2 gives the exact data flow.

Flow: pad bottom/right to a multiple of 16 -> ViT blocks ``out_indices`` (raw, no final norm), patch tokens and
class token -> reassemble (readout "project": ``[patch, cls] -> Linear -> GELU``, 1x1 conv, resize to 1/4, 1/8,
1/16, 1/32) -> 3x3 convs -> four fusion blocks -> 3x3 conv + ReLU -> ``HeadDepth`` -> 256 bin logits ->
``relu(l) + 0.1`` normalised -> expectation over ``linspace(0.001, 10, 256)`` -> x10 = metres.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import DinoscopeError
from core.models.vit import VisionTransformer
from core.weights.load import read_checkpoint, strict_load
from geodino.heads import Features, bin_moments, height_bins, resize_maps
from geodino.hrch_checkpoints import infer_hrch_config

__all__ = [
    "DPTCanopyHead",
    "DPTHead",
    "HRCHModel",
    "build_hrch",
    "infer_hrch_config",
    "is_hrch_state_dict",
    "load_hrch",
]

log = logging.getLogger(__name__)

HRCH_PATCH = 16
_QUANTISED_SUFFIXES = ("._packed_params._packed_params", "._packed_params.dtype", ".zero_point", ".scale")


class ConvModule(nn.Module):
    """An mmseg-style conv wrapper (weights under ``.conv``) with an optional ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        padding: int = 0,
        bias: bool = True,
        relu: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=bias)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C_in, H, W] -> [B, C_out, H', W']`` (conv, then ReLU when enabled)."""
        x = self.conv(x)
        return torch.relu(x) if self.relu else x


class ReassembleBlocks(nn.Module):
    """Tokens of 4 blocks -> 4 maps at 4x, 2x, 1x and 1/2 the patch grid, with ``post_process_channels``."""

    def __init__(self, embed_dim: int, post_process_channels: Sequence[int]) -> None:
        super().__init__()
        c = list(post_process_channels)
        self.projects = nn.ModuleList(ConvModule(embed_dim, ch, 1) for ch in c)
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(c[0], c[0], kernel_size=4, stride=4),
                nn.ConvTranspose2d(c[1], c[1], kernel_size=2, stride=2),
                nn.Identity(),
                nn.Conv2d(c[3], c[3], kernel_size=3, stride=2, padding=1),
            ]
        )
        self.readout_projects = nn.ModuleList(nn.Sequential(nn.Linear(2 * embed_dim, embed_dim), nn.GELU()) for _ in c)

    def forward(self, inputs: Features) -> list[Tensor]:
        """4 x ``(patch [B, D, h, w], cls [B, D])`` -> ``[B, c_i, s_i * h, s_i * w]`` with ``s = 4, 2, 1, 1/2``."""
        out = []
        for i, (patch, cls) in enumerate(inputs):
            b, d, h, w = patch.shape
            tokens = patch.flatten(2).transpose(1, 2)  # B x N x D
            readout = cls[:, None, :].expand_as(tokens)
            tokens = self.readout_projects[i](torch.cat((tokens, readout), dim=-1))  # patch first, then cls
            x = tokens.transpose(1, 2).reshape(b, d, h, w)
            out.append(self.resize_layers[i](self.projects[i](x)))
        return out


class PreActResidualConvUnit(nn.Module):
    """``x + conv2(relu(conv1(relu(x))))``, 3x3 convs without bias or norm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvModule(channels, channels, 3, padding=1, bias=False)
        self.conv2 = ConvModule(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Shape-preserving residual refinement ``[B, C, H, W] -> [B, C, H, W]``."""
        return x + self.conv2(torch.relu(self.conv1(torch.relu(x))))


class FeatureFusionBlock(nn.Module):
    """Add a (resized) skip through a residual unit, refine, upsample x2 (``align_corners=True``), 1x1 project."""

    def __init__(self, channels: int, first: bool = False) -> None:
        super().__init__()
        self.project = ConvModule(channels, channels, 1)
        self.res_conv_unit1 = None if first else PreActResidualConvUnit(channels)
        self.res_conv_unit2 = PreActResidualConvUnit(channels)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        """``x [B, F, H, W]`` plus the next level's ``skip`` (resized to ``x`` if needed) -> ``[B, F, 2H, 2W]``."""
        if skip is not None and self.res_conv_unit1 is not None:
            if skip.shape != x.shape:
                skip = F.interpolate(skip, size=x.shape[2:], mode="bilinear", align_corners=False)
            x = x + self.res_conv_unit1(skip)
        x = self.res_conv_unit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.project(x)


class Upsample2x(nn.Module):
    """Bilinear x2 with ``align_corners=True`` (a parameter-free slot in ``HeadDepth``)."""

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, C, 2H, 2W]``."""
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class HeadDepth(nn.Module):
    """``[B, F, ...] -> [B, n_bins, 2x ...]``: conv3x3 F->F/2, x2, conv3x3 -> hidden, ReLU, conv1x1 -> bins."""

    def __init__(self, channels: int, n_bins: int = 256, hidden: int = 32) -> None:
        super().__init__()
        self.head = nn.Sequential(
            nn.Conv2d(channels, channels // 2, 3, padding=1),
            Upsample2x(),
            nn.Conv2d(channels // 2, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, n_bins, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Decoder features ``[B, F, H, W]`` -> bin logits ``[B, n_bins, 2H, 2W]``."""
        return self.head(x)


class DPTHead(nn.Module):
    """HRCH's DPT decoder: 4 blocks of ``(patch [B, D, h, w], cls [B, D])`` -> bin logits ``[B, n_bins, H', W']``.

    ``H' = 16 * 2 * ceil(h / 2)``: 16x the patch grid, rounded up to an even grid (the level-3 stride-2 conv).

    Args:
        embed_dim: backbone width D.
        post_process_channels: reassembled widths per level (HRCH: D/8, D/4, D/2, D).
        channels: decoder width F (HRCH: 256).
        n_bins: number of height bins; hidden: width before the bin conv (HRCH: 32).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        post_process_channels: Sequence[int],
        channels: int = 256,
        n_bins: int = 256,
        hidden: int = 32,
    ) -> None:
        super().__init__()
        if len(post_process_channels) != 4:
            raise ValueError(f"the DPT head takes 4 levels, got post_process_channels={post_process_channels}")
        self.reassemble_blocks = ReassembleBlocks(embed_dim, post_process_channels)
        self.convs = nn.ModuleList(ConvModule(ch, channels, 3, padding=1, bias=False) for ch in post_process_channels)
        self.fusion_blocks = nn.ModuleList(FeatureFusionBlock(channels, first=i == 0) for i in range(4))
        self.project = ConvModule(channels, channels, 3, padding=1, relu=True)
        self.conv_depth = HeadDepth(channels, n_bins, hidden)

    def forward(self, inputs: Features) -> Tensor:
        """Coarsest level first through the fusion blocks, then the depth head: bin logits ``[B, n_bins, H', W']``."""
        if len(inputs) != 4:
            raise ValueError(f"the DPT head needs the outputs of 4 blocks, got {len(inputs)}")
        levels = [conv(x) for conv, x in zip(self.convs, self.reassemble_blocks(inputs), strict=False)]
        x = self.fusion_blocks[0](levels[3])
        for i in range(1, 4):
            x = self.fusion_blocks[i](x, levels[3 - i])
        return self.conv_depth(self.project(x))


class DPTCanopyHead(nn.Module):
    """A light DPT decoder as a canopy head: ``features -> {"height", "std"}`` ``[B, H, W]`` in metres.

    Same bins and rules as :class:`geodino.heads.LinearCanopyHead`; the logits (16x the patch grid) are resized
    bilinearly to ``out_size`` after the expectation. The ``ConvModule`` convs start from Kaiming-normal weights
    and zero biases, as mmcv's ``ConvModule`` initialises them in HRCH; PyTorch's default init leaves the output
    almost constant. Training it needs far more steps than the linear head (see the fit report).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        channels: int = 64,
        n_bins: int = 256,
        min_height: float = 0.0,
        max_height: float = 60.0,
        bin_rule: str = "relu_eps",
        eps: float = 0.1,
        hidden: int = 32,
    ) -> None:
        super().__init__()
        post = [max(1, embed_dim // 8), max(1, embed_dim // 4), max(1, embed_dim // 2), embed_dim]
        self.decode = DPTHead(
            embed_dim=embed_dim, post_process_channels=post, channels=channels, n_bins=n_bins, hidden=hidden
        )
        for module in self.decode.modules():
            if isinstance(module, ConvModule):
                nn.init.kaiming_normal_(module.conv.weight, mode="fan_out", nonlinearity="relu")
                if module.conv.bias is not None:
                    nn.init.zeros_(module.conv.bias)
        self.bin_rule = bin_rule
        self.eps = eps
        self.register_buffer("bins", height_bins(n_bins, min_height, max_height), persistent=False)

    has_std = True

    def forward(self, features: Features, out_size: tuple[int, int]) -> dict[str, Tensor]:
        """4 blocks of ``(patch, cls)`` -> ``{"height", "std"}`` ``[B, *out_size]`` metres (bin mean and std)."""
        mean, std = bin_moments(self.decode(features), self.bins, self.bin_rule, self.eps)
        return {"height": resize_maps(mean, out_size), "std": resize_maps(std, out_size)}


class HRCHModel(nn.Module):
    """Backbone + DPT head with the official key names (``backbone.*``, ``decode_head.*``).

    ``forward(x [B, 3, H, W] normalised) -> {"height", "std", "logits"}``: heights and std ``[B, H', W']`` in
    metres, logits ``[B, n_bins, H', W']``, where ``H' = 32 * ceil(H / 32)`` as in the official code (not cropped;
    :class:`geodino.model.CanopyModel` crops). Inputs are zero-padded bottom/right to a multiple of 16.
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        decode_head: DPTHead,
        *,
        out_indices: Sequence[int],
        min_depth: float = 0.001,
        max_depth: float = 10.0,
        eps: float = 0.1,
        output_scale: float = 10.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.out_indices = [int(i) for i in out_indices]
        self.eps = eps
        self.output_scale = output_scale
        n_bins = decode_head.conv_depth.head[-1].out_channels
        self.register_buffer("bins", height_bins(n_bins, min_depth, max_depth), persistent=False)

    has_std = True

    def features(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Padded input -> raw block outputs ``[(patch [B, D, h, w], cls [B, D])] * 4``."""
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % HRCH_PATCH, 0, -h % HRCH_PATCH))
        return list(
            self.backbone.get_intermediate_layers(
                x, n=self.out_indices, reshape=True, return_class_token=True, norm=False
            )
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """See the class docstring: heights and std in metres (bin expectation x ``output_scale``) plus logits."""
        logits = self.decode_head(self.features(x))
        mean, std = bin_moments(logits, self.bins, "relu_eps", self.eps)
        return {"height": mean * self.output_scale, "std": std * self.output_scale, "logits": logits}


def build_hrch(config: Mapping[str, Any]) -> HRCHModel:
    """An :class:`HRCHModel` from :func:`infer_hrch_config`'s output (random weights); keeps ``config``."""
    model = HRCHModel(
        VisionTransformer(**config["backbone"]), DPTHead(**config["head"]), out_indices=config["out_indices"]
    )
    model.hrch_config = dict(config)
    return model


def is_hrch_state_dict(sd: Mapping[str, Any]) -> bool:
    """True when ``sd`` holds HRCH decoder tensors (``decode_head.*``), i.e. a full model, not a bare backbone."""
    return any(k.startswith("decode_head.") for k in sd)


def load_hrch(
    source: str | os.PathLike | dict, *, num_heads: int | None = None, out_indices: Sequence[int] | None = None
) -> HRCHModel:
    """Load a full HRCH checkpoint (path, ``{"state_dict": ...}`` or the flat state dict) strictly, in eval mode.

    Sizes are inferred from the shapes (huge, large or any reduced layout); ``num_heads`` and ``out_indices``
    come from the arguments, else from an embedded ``config["backbone"]`` (as in the reference fixture), else
    from the table of public checkpoints (:data:`geodino.hrch_checkpoints.PUBLIC_HRCH`); another layout without
    them is refused rather than guessed. Any missing, unexpected or mis-shaped key is an error naming them.
    """
    where = None if isinstance(source, dict) else source
    sd, _, container = read_checkpoint(source)
    if sd and all(k.startswith("chm_module_.") for k in sd):  # opengeos/geoai's port wraps the model
        sd = {k[len("chm_module_.") :]: v for k, v in sd.items()}
    quantised = sorted(k for k in sd if k.endswith(_QUANTISED_SUFFIXES))
    if quantised:
        raise DinoscopeError(
            f"this is an int8-quantised HRCH checkpoint (keys such as {quantised[0]!r})",
            path=where,
            field="state_dict",
            fix="use the float checkpoint (SSLhuge_satellite.pth) or dequantise it first",
        )
    if not is_hrch_state_dict(sd):
        raise DinoscopeError(
            "the checkpoint has no 'decode_head.*' tensors, so it is not a full HRCH model",
            path=where,
            field="decode_head",
            fix="a bare backbone needs a fitted head: run `dinoscope canopy fit` with it",
        )
    foreign = sorted(k for k in sd if not k.startswith(("backbone.", "decode_head.")))
    if foreign:
        raise DinoscopeError(
            f"unexpected keys outside backbone./decode_head.: {foreign[:5]}",
            path=where,
            field="state_dict",
            fix="pass the HRCH checkpoint's state_dict unchanged",
        )
    embedded = container.get("config", {}).get("backbone", {}) if isinstance(container.get("config"), dict) else {}
    num_heads = num_heads or embedded.get("num_heads")
    out_indices = out_indices if out_indices is not None else embedded.get("out_indices")
    config = infer_hrch_config({k: tuple(v.shape) for k, v in sd.items()}, num_heads=num_heads, out_indices=out_indices)
    model = build_hrch(config)
    strict_load(model, sd, where)
    return model.eval()
