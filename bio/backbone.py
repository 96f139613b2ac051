"""Channel-matched cell backbones: any DINOv2-family checkpoint, fed cell crops by channel *name*.

Two channel designs are supported (Cell-DINO and Channel-Adaptive DINO in facebookresearch/dinov2 PR #575):

* **fixed channels** (Cell-DINO, DINO4Cells): the patch embedding takes ``in_chans`` channels in one order, named
  by ``WeightMeta.channel_names``. Data channels are matched by name and reordered; extra data channels are
  ignored; a missing one is a :class:`DinoscopeError` listing what the weights need and what the data has.
* **bag of channels** (Channel-Adaptive DINO, ``channel_adaptive=True``, ``in_chans=1``): every channel is encoded on
  its own and the per-channel features are concatenated in the order the channels are given, so any subset or order
  of channels works (De Lorenci et al., "Scaling Channel-Adaptive Self-Supervised Learning", TMLR 2025).

Features are DINOv2's linear-probe input (:func:`core.models.linear_input`): the class tokens of the last
``n_last_blocks`` blocks, plus the mean patch token with ``avgpool`` (per channel for bag of channels, as in
Cell-DINO's ``create_linear_input``).

Input normalisation (per crop, before the model):

* ``zscore``: per-image, per-channel ``(x - mean_HW) / (std_HW + 1e-7)``, Cell-DINO's ``SelfNormalizeNoDiv``
  (``dinov2/data/cell_dino/transforms.py``). Cell-DINO divides by 255 first; the z-score makes that a no-op up to
  the epsilon, so raw 16-bit crops are standardised directly.
* ``meta``: scale to [0, 1] by dtype (uint8 / 255, uint16 / 65535, float as-is), then the per-channel ``mean`` and
  ``std`` stored in the weights' metadata.
* ``none``: the crops are passed as float32 unchanged (already normalised inputs, parity tests).
* ``auto``: ``zscore`` for weights trained with self-standardised fluorescence crops (sidecar
  ``extra.input_normalisation == "per_image_zscore"``) and for Cell-DINO checkpoints; ``meta`` otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from core.distributed.device import resolve_device
from core.errors import DinoscopeError
from core.models import VisionTransformer, linear_input
from core.weights import WeightMeta, load_backbone

log = logging.getLogger(__name__)

NORMALISATIONS = ("auto", "zscore", "meta", "none")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ZSCORE_EPS = 1e-7
_HASH_BLOCK = 2**22


@dataclass(frozen=True)
class ChannelPlan:
    """How data channels feed the model.

    Attributes:
        indices: positions in the data's channel list, in the order the model consumes them.
        names: the matching channel names (model order); features are laid out in this order.
        ignored: data channels the model does not use.
    """

    indices: list[int]
    names: list[str]
    ignored: list[str]


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in blocks (weights files can be gigabytes)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


class CellBackbone:
    """A frozen ViT plus the channel matching and normalisation that turn cell crops into embeddings.

    Args:
        model: the backbone (``core.models.VisionTransformer``), already loaded.
        meta: its :class:`~core.weights.WeightMeta`.
        normalisation: one of :data:`NORMALISATIONS`.
        n_last_blocks: class tokens of this many final blocks are concatenated.
        avgpool: also append the mean patch token of the last block.
        input_size: resize crops (bilinear) to this side before the model; ``None`` keeps the crop size.
        batch_size: crops per forward pass (for bag of channels the model sees ``batch_size * C`` images).
        device: ``cpu``, ``cuda``, ``cuda:1`` or ``auto`` (CUDA when available).
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast (CUDA only; CPU always runs fp32).
        weights_path, weights_sha256: provenance recorded with every embedding.
    """

    def __init__(
        self,
        model: VisionTransformer,
        meta: WeightMeta,
        *,
        normalisation: str = "auto",
        n_last_blocks: int = 1,
        avgpool: bool = False,
        input_size: int | None = None,
        batch_size: int = 256,
        device: str = "auto",
        precision: str = "fp32",
        weights_path: str | None = None,
        weights_sha256: str | None = None,
    ) -> None:
        if normalisation not in NORMALISATIONS:
            raise DinoscopeError(
                f"unknown normalisation {normalisation!r}",
                field="normalisation",
                fix=f"use one of {', '.join(NORMALISATIONS)}",
            )
        if precision not in PRECISIONS:
            raise DinoscopeError(
                f"unknown precision {precision!r}", field="precision", fix=f"use one of {', '.join(PRECISIONS)}"
            )
        if not 1 <= n_last_blocks <= len(model.blocks):
            raise DinoscopeError(
                f"n_last_blocks must be 1..{len(model.blocks)}, got {n_last_blocks}", field="n_last_blocks"
            )
        if batch_size < 1:
            raise DinoscopeError(f"batch_size must be positive, got {batch_size}", field="batch_size")
        if model.in_chans == 1 and not model.bag_of_channels:
            # a 1-channel model can only see several channels one at a time: that is the bag of channels
            model.bag_of_channels = True
            meta.model_kwargs["channel_adaptive"] = True
        self.meta = meta
        self.normalisation = _resolve_normalisation(normalisation, meta)
        self.n_last_blocks = n_last_blocks
        self.avgpool = avgpool
        self.input_size = input_size or None
        self.batch_size = batch_size
        self.device = resolve_device(str(device), field="model.device")
        self.autocast_dtype = PRECISIONS[precision] if self.device.type == "cuda" else None
        self.precision = precision if self.autocast_dtype is not None else "fp32"
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256
        self.model = model.eval().to(self.device)
        self._staging: Tensor | None = None  # page-locked buffer of the host-to-device copies (CUDA only)

    @classmethod
    def load(
        cls,
        source: str | os.PathLike | dict,
        *,
        weights_channels: Sequence[str] | None = None,
        load_overrides: dict[str, Any] | None = None,
        **options: Any,
    ) -> CellBackbone:
        """Load weights with :func:`core.weights.load_backbone` and wrap them.

        ``weights_channels`` names the model's input channels, in its order, when the checkpoint carries none or
        generic ones (``ch0, ch1, ...``; e.g. a Cell-DINO ``.pth``). It is ignored for bag-of-channels weights.
        ``load_overrides`` go to :func:`~core.weights.load_backbone` (``num_heads`` for non-standard widths,
        ``format``...); ``options`` to the constructor.
        """
        model, meta = load_backbone(source, **(load_overrides or {}))
        if weights_channels and not meta.channel_adaptive:
            if len(weights_channels) != meta.in_chans:
                raise DinoscopeError(
                    f"{len(weights_channels)} weights channel names given but the model takes {meta.in_chans} channels",
                    field="weights_channels",
                    fix=f"name exactly {meta.in_chans} channels, in the model's order",
                )
            meta.channel_names = [str(name) for name in weights_channels]
        path = None if isinstance(source, dict) else str(source)
        sha = file_sha256(source) if path else None
        return cls(model, meta, weights_path=path, weights_sha256=sha, **options)

    # ------------------------------------------------------------------------------------------------ channels
    @property
    def channel_adaptive(self) -> bool:
        """True for bag-of-channels weights (Channel-Adaptive DINO): each channel is encoded on its own."""
        return bool(getattr(self.model, "bag_of_channels", False))

    @property
    def required_channels(self) -> list[str] | None:
        """The names fixed-channel weights need, in model order; ``None`` for bag of channels (any set)."""
        return None if self.channel_adaptive else list(self.meta.channel_names)

    def match_channels(self, data_channels: Sequence[str]) -> ChannelPlan:
        """Map the data's channel names onto the model's inputs (see the module docstring)."""
        data = [str(name) for name in data_channels]
        if len(set(data)) != len(data):
            raise DinoscopeError(
                f"duplicate channel names {data}", field="channel_names", fix="give every channel a distinct name"
            )
        if self.channel_adaptive:
            if not data:
                raise DinoscopeError("no channels to embed", field="channels", fix="select at least one channel")
            return ChannelPlan(list(range(len(data))), data, [])
        needed = list(self.meta.channel_names)
        missing = [name for name in needed if name not in data]
        if missing:
            generic = all(name == f"ch{i}" for i, name in enumerate(needed))
            fix = (
                "the weights carry generic channel names: name the model's channels in order with "
                "--weights-channels (e.g. DNA,RNA,ER,AGP,Mito)"
                if generic
                else "provide data with these channels (names must match exactly), or rename the data's channels"
            )
            raise DinoscopeError(
                f"the weights need channels {needed} but the data has {data}; missing {missing}",
                field=missing[0],
                fix=fix,
            )
        ignored = [name for name in data if name not in needed]
        return ChannelPlan([data.index(name) for name in needed], needed, ignored)

    def embedding_dim(self, n_channels: int) -> int:
        """Feature length for ``n_channels`` matched channels."""
        per_channel = self.model.embed_dim * (self.n_last_blocks + int(self.avgpool))
        return per_channel * (n_channels if self.channel_adaptive else 1)

    # ------------------------------------------------------------------------------------------------ embedding
    def embed(self, crops: np.ndarray | Tensor, channel_names: Sequence[str]) -> np.ndarray:
        """``crops [N, C, S, S]`` with ``C`` named channels -> float32 embeddings ``[N, D]``."""
        plan = self.match_channels(channel_names)
        if crops.ndim != 4 or crops.shape[1] != len(channel_names):
            raise DinoscopeError(
                f"crops have shape {tuple(crops.shape)}, expected N x {len(channel_names)} x S x S",
                field="crops",
                fix="pass channels-first crops, one channel per name",
            )
        size = self.input_size or int(crops.shape[-1])
        if size % self.model.patch_size or crops.shape[-1] != crops.shape[-2]:
            raise DinoscopeError(
                f"crop size {tuple(crops.shape[-2:])} is not a square multiple of the patch size "
                f"{self.model.patch_size}",
                field="crop_size",
                fix=f"use a crop size (or input_size) that is a multiple of {self.model.patch_size}",
            )
        out = np.empty((len(crops), self.embedding_dim(len(plan.indices))), np.float32)
        for start in range(0, len(crops), self.batch_size):
            batch = _as_float_tensor(crops[start : start + self.batch_size], plan.indices)
            batch, self._staging = stage_batch(batch, self.device, self._staging)
            out[start : start + len(batch)] = self._forward(self._normalise(batch, crops.dtype)).numpy()
        return out

    @torch.inference_mode()
    def _forward(self, batch: Tensor) -> Tensor:
        batch = batch.to(self.device, non_blocking=True)
        if self.input_size and batch.shape[-1] != self.input_size:
            batch = F.interpolate(batch, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            layers = self.model.get_intermediate_layers(batch, self.n_last_blocks, return_class_token=True)
        return linear_input(layers, self.n_last_blocks, self.avgpool).float().cpu()

    def _normalise(self, batch: Tensor, dtype: Any) -> Tensor:
        if self.normalisation == "none":
            return batch
        if self.normalisation == "zscore":
            mean = batch.mean(dim=(-2, -1), keepdim=True)
            std = batch.std(dim=(-2, -1), keepdim=True, unbiased=False)
            return (batch - mean) / (std + ZSCORE_EPS)
        batch = batch / _unit_divisor(dtype)
        mean = torch.tensor(self.meta.mean, dtype=torch.float32, device=batch.device)
        std = torch.tensor(self.meta.std, dtype=torch.float32, device=batch.device)
        if not self.channel_adaptive:
            return (batch - mean[:, None, None]) / std[:, None, None]
        return (batch - mean[0]) / std[0]  # one statistic shared by every channel of a 1-channel model

    # ------------------------------------------------------------------------------------------------ provenance
    def describe(self, channel_names: Sequence[str]) -> dict[str, Any]:
        """What produced the embeddings of these channels; stored with every embedding run and head."""
        plan = self.match_channels(channel_names)
        return {
            "channel_names": plan.names,
            "channel_mode": "bag_of_channels" if self.channel_adaptive else "fixed",
            "normalisation": {
                "method": self.normalisation,
                "eps": ZSCORE_EPS if self.normalisation == "zscore" else None,
                "mean": self.meta.mean if self.normalisation == "meta" else None,
                "std": self.meta.std if self.normalisation == "meta" else None,
            },
            "features": {
                "n_last_blocks": self.n_last_blocks,
                "avgpool": self.avgpool,
                "input_size": self.input_size,
                "dim": self.embedding_dim(len(plan.names)),
            },
            "weights": {"path": self.weights_path, "sha256": self.weights_sha256, "meta": self.meta.to_dict()},
        }


def _resolve_normalisation(choice: str, meta: WeightMeta) -> str:
    if choice != "auto":
        return choice
    if meta.extra.get("input_normalisation") == "per_image_zscore" or meta.source_format == "cell_dino":
        return "zscore"
    return "meta"


def _unit_divisor(dtype: Any) -> float:
    dtype = np.dtype(str(dtype).removeprefix("torch."))
    if dtype == np.uint8:
        return 255.0
    if dtype == np.uint16:
        return 65535.0
    return 1.0


def _as_float_tensor(crops: np.ndarray | Tensor, indices: list[int]) -> Tensor:
    if isinstance(crops, Tensor):
        return crops[:, indices].float()
    return torch.from_numpy(np.ascontiguousarray(crops[:, indices], dtype=np.float32))


def stage_batch(
    batch: Tensor, device: torch.device, staging: Tensor | None, pin: bool | None = None
) -> tuple[Tensor, Tensor | None]:
    """``batch`` on ``device``, and the staging buffer to pass next time.

    On CUDA the batch is copied into a reused page-locked (pinned) host buffer and sent with a non-blocking copy,
    the fast path of host-to-device transfers; the normalisation and the model then run on the device. The buffer is
    reused only after the previous batch's results came back to the host, which waits for its copy. Elsewhere the
    batch is returned as it is. ``pin`` (default: whether ``device`` is CUDA) is for tests on machines without one.
    """
    pin = device.type == "cuda" if pin is None else pin
    if not pin:
        return batch.to(device), staging
    numel = batch.numel()
    if staging is None or staging.numel() < numel or staging.dtype != batch.dtype:
        staging = torch.empty(numel, dtype=batch.dtype, pin_memory=device.type == "cuda")
    staged = staging[:numel].view(batch.shape)
    staged.copy_(batch)
    return staged.to(device, non_blocking=True), staging
