"""A fitted canopy-height model: backbone + head + band normalisation + band names + metadata, on disk and in memory.

On disk a model is ``NAME.safetensors`` plus the JSON sidecar ``NAME.json`` (also embedded in the safetensors
header, so the weights stay usable if the JSON is lost), both written atomically. The backbone is either embedded
(``backbone.*`` tensors) or referenced by path (``backbone.path``, relative to the model file when possible) for
large shared backbones. :func:`load_canopy_model` also accepts a full HighResCanopyHeight checkpoint
(``.pth``), which it wraps with HRCH's own input normalisation.

:meth:`CanopyModel.predict_batch` is the ``model_fn`` of :func:`geodino.predict.predict_raster`: normalised
``[B, C, H, W]`` in, ``{"height", "std"}`` ``[B, H, W]`` metres out, padding to the patch size and cropping back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from core.errors import DinoscopeError
from core.io import atomic_path, write_json
from core.models.factories import ARCH_SIZES
from core.models.vit import VisionTransformer
from core.weights.formats import strip_prefix
from core.weights.load import HRCH_MEAN, HRCH_STD, load_backbone, read_checkpoint, strict_load
from core.weights.meta import WeightMeta, default_channel_names, default_normalisation
from geodino.heads import Features, LinearCanopyHead
from geodino.hrch import HRCH_PATCH, DPTCanopyHead, HRCHModel, build_hrch, is_hrch_state_dict, load_hrch
from geodino.normalise import BandNormaliser
from geodino.values import InputRecord

MODEL_FORMAT = "dinoscope_canopy"
MODEL_FORMAT_VERSION = 1
HEADS: dict[str, Callable[..., nn.Module]] = {"linear": LinearCanopyHead, "dpt": DPTCanopyHead}


def build_head(head_type: str, **kwargs: Any) -> nn.Module:
    """A head by name (:data:`HEADS`); an unknown name lists the valid ones."""
    if head_type not in HEADS:
        raise DinoscopeError(f"unknown head type {head_type!r}", field="head.type", fix=f"use one of {sorted(HEADS)}")
    return HEADS[head_type](**kwargs)


class BackboneHead(nn.Module):
    """ViT + canopy head: ``x [B, C, H, W]`` (H, W multiples of the patch) -> head outputs ``[B, H, W]``.

    Args:
        layers: 0-based block indices whose outputs feed the head, in block order.
        feature_norm: apply the backbone's final LayerNorm to those outputs (DINOv2's linear depth head does not).
    """

    def __init__(
        self, backbone: VisionTransformer, head: nn.Module, *, layers: list[int], feature_norm: bool = False
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.layers = [int(i) for i in layers]
        self.feature_norm = feature_norm

    @property
    def has_std(self) -> bool:
        """Whether the head also predicts a per-pixel height std."""
        return bool(getattr(self.head, "has_std", False))

    def features(self, x: Tensor) -> Features:
        """Outputs of blocks ``layers``: ``[(patch [B, D, H/p, W/p], cls [B, D])]``, the head's input (and what
        :class:`geodino.fit_data.FeatureCache` stores)."""
        return list(
            self.backbone.get_intermediate_layers(
                x, n=self.layers, reshape=True, return_class_token=True, norm=self.feature_norm
            )
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x [B, C, H, W]`` -> ``{"height", "std"?}`` ``[B, H, W]`` in metres."""
        return self.head(self.features(x), tuple(x.shape[-2:]))


class CanopyModel(nn.Module):
    """A ready-to-predict canopy model.

    Args:
        net: :class:`BackboneHead` or :class:`geodino.hrch.HRCHModel`; maps a padded input to ``{"height",
            "std"?}`` maps at least as large as the padded input.
        normaliser: raw band values -> model input (:class:`geodino.normalise.BandNormaliser`).
        band_names: the bands the model was trained on, in order.
        spec: how to rebuild ``net`` (written to the sidecar).
        metadata: free-form provenance (training GSD, recipe, metrics...).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        normaliser: BandNormaliser,
        band_names: list[str],
        spec: dict[str, Any],
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.normaliser = normaliser
        self.band_names = list(band_names)
        self.spec = spec
        self.metadata = dict(metadata or {})
        self.pad_multiple = HRCH_PATCH if isinstance(net, HRCHModel) else net.backbone.patch_size

    @property
    def has_std(self) -> bool:
        """Whether predictions include a ``std`` map (uncertainty in metres)."""
        return bool(self.net.has_std)

    @property
    def in_chans(self) -> int:
        """Number of input bands, one per name in ``band_names``."""
        return len(self.band_names)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x [B, C, H, W]`` normalised -> ``{"height": [B, H, W], "std": [B, H, W]}`` (std when the head has one).

        Zero-pads bottom/right (zero is the mean colour after normalisation, as in HRCH) and crops back.
        """
        h, w = x.shape[-2:]
        m = self.pad_multiple
        out = self.net(F.pad(x, (0, -w % m, 0, -h % m)))
        return {k: out[k][:, :h, :w] for k in ("height", "std") if k in out}

    def predict_batch(self, batch: Tensor) -> dict[str, Tensor]:
        """``model_fn`` for :func:`geodino.predict.predict_raster`: float32 CPU maps, heights clamped at 0 m.

        A batch in pinned memory is copied to a CUDA device asynchronously (``non_blocking``): the copy is queued on
        the stream ahead of the forward pass, and the host thread only waits when it fetches the result."""
        param = next(self.net.parameters())
        self.eval()
        with torch.inference_mode():
            batch = batch.to(param.device, non_blocking=batch.is_pinned() and param.device.type == "cuda")
            out = self(batch.to(param.dtype))
        result = {"height": out["height"].float().clamp_min(0.0).cpu()}
        if "std" in out:
            result["std"] = out["std"].float().cpu()
        return result


def backbone_head_model(
    backbone: VisionTransformer,
    meta: WeightMeta,
    head_type: str,
    head_kwargs: dict[str, Any],
    *,
    layers: list[int],
    feature_norm: bool,
    normaliser: BandNormaliser,
    band_names: list[str],
    metadata: dict[str, Any] | None = None,
) -> CanopyModel:
    """Assemble a :class:`CanopyModel` from a backbone, its metadata and a head description."""
    head = build_head(head_type, **head_kwargs)
    spec = {
        "kind": "backbone_head",
        "backbone_meta": meta.to_dict(),
        "layers": [int(i) for i in layers],
        "feature_norm": feature_norm,
        "head": {"type": head_type, "kwargs": dict(head_kwargs)},
    }
    net = BackboneHead(backbone, head, layers=layers, feature_norm=feature_norm)
    return CanopyModel(net, normaliser=normaliser, band_names=band_names, spec=spec, metadata=metadata)


def hrch_canopy_model(hrch: HRCHModel, metadata: dict[str, Any] | None = None) -> CanopyModel:
    """Wrap an HRCH model with its uint8 RGB normalisation (``src/transforms.py`` SSLNorm constants)."""
    names = default_channel_names(3)
    normaliser = BandNormaliser.from_weights_meta(HRCH_MEAN, HRCH_STD, 255.0, band_names=names)
    spec = {"kind": "hrch", "config": hrch.hrch_config}
    record = InputRecord(dtype="uint8", range=(0.0, 255.0))  # "the input data is uint8 RGB" (HRCH issue #10)
    info = {"source": "HighResCanopyHeight", "input": record.to_dict(), "gsd_m": 0.6} | dict(metadata or {})
    return CanopyModel(hrch, normaliser=normaliser, band_names=names, spec=spec, metadata=info)


def random_backbone(
    arch: str, patch_size: int, image_size: int, overrides: dict[str, Any] | None = None
) -> tuple[VisionTransformer, WeightMeta]:
    """A randomly initialised table-size ViT (DINOv2 init) and its metadata; seed torch first for repeatability."""
    if arch not in ARCH_SIZES:
        raise DinoscopeError(
            f"unknown backbone arch {arch!r}",
            field="backbone.arch",
            fix=f"use one of {sorted(ARCH_SIZES)}, or give backbone.weights",
        )
    embed_dim, depth, num_heads = ARCH_SIZES[arch]
    kwargs = {
        "img_size": image_size + (-image_size % patch_size),
        "patch_size": patch_size,
        "in_chans": 3,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": 4.0,
        **(overrides or {}),
    }
    mean, std = default_normalisation(kwargs["in_chans"])
    meta = WeightMeta(
        arch=arch,
        model_kwargs=kwargs,
        channel_names=default_channel_names(kwargs["in_chans"]),
        mean=mean,
        std=std,
        source_format="random_init",
    )
    return VisionTransformer(**kwargs).eval(), meta


# -- persistence -------------------------------------------------------------------------------------------------
def save_canopy_model(
    model: CanopyModel, path: str | os.PathLike, *, backbone_path: str | os.PathLike | None = None
) -> Path:
    """Write ``path`` (.safetensors) and its JSON sidecar atomically; returns the safetensors path.

    With ``backbone_path`` the backbone tensors are not stored; the sidecar references that file instead (relative
    to the model's directory when it lies below it).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    spec = json.loads(json.dumps(model.spec))
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    if backbone_path is not None:
        if spec["kind"] != "backbone_head":
            raise DinoscopeError("only fitted heads can reference their backbone by path", field="backbone_path")
        tensors = {k: v for k, v in tensors.items() if not k.startswith("backbone.")}
        spec["backbone_path"] = _relative_to(Path(backbone_path), path.parent)
    sidecar = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "net": spec,
        "normaliser": model.normaliser.to_dict(),
        "band_names": model.band_names,
        "metadata": model.metadata,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"dinoscope_canopy": json.dumps(sidecar, default=str)})
    write_json(path.with_suffix(".json"), sidecar)
    return path


def load_canopy_model(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    num_heads: int | None = None,
    out_indices: Sequence[int] | None = None,
) -> CanopyModel:
    """Load a model saved by :func:`save_canopy_model`, or a full HRCH checkpoint (``.pth``/``.pt``), in eval mode.

    ``num_heads`` and ``out_indices`` (the blocks feeding the decoder) are only needed for HRCH checkpoints that
    are not one of the public ones (:data:`geodino.hrch_checkpoints.PUBLIC_HRCH`) and embed no config.

    Example::

        import torch
        from rasterio.windows import Window
        from geodino import RasterSource, load_canopy_model

        model = load_canopy_model("runs/canopy_fit/model.safetensors")
        with RasterSource("scene.tif", bands=model.band_names) as src:
            data, valid = src.read(Window(0, 0, 224, 224))       # (C, 224, 224) raw values, (224, 224) mask
        x = torch.from_numpy(model.normaliser(data, valid))[None]
        heights = model.predict_batch(x)["height"][0]             # (224, 224) metres
    """
    path = Path(path)
    if not path.exists():
        raise DinoscopeError(
            "canopy model not found",
            path=path,
            field="model",
            fix="give the model.safetensors written by `dinoscope canopy fit`, or an HRCH .pth",
        )
    if path.suffix != ".safetensors":
        sd, _, _ = read_checkpoint(path)
        if not is_hrch_state_dict(sd):
            raise DinoscopeError(
                "this checkpoint is neither a canopy model nor a full HRCH model (no 'decode_head.*' keys)",
                path=path,
                field="model",
                fix="fit a head on this backbone with `dinoscope canopy fit`",
            )
        hrch = load_hrch(path, num_heads=num_heads, out_indices=out_indices)
        model = hrch_canopy_model(hrch, {"checkpoint": str(path)})
        return model.to(device).eval()
    sidecar, tensors = _read_model_file(path)
    spec = sidecar["net"]
    normaliser = BandNormaliser.from_dict(sidecar["normaliser"])
    if spec.get("kind") == "hrch":
        net: nn.Module = build_hrch(spec["config"])
        strict_load(net, tensors, path)
        model = CanopyModel(
            net, normaliser=normaliser, band_names=sidecar["band_names"], spec=spec, metadata=sidecar.get("metadata")
        )
        return model.to(device).eval()
    meta = WeightMeta.from_dict(spec["backbone_meta"], path)
    if "backbone_path" in spec:
        backbone_file = _resolve(spec["backbone_path"], path.parent)
        backbone, found = load_backbone(backbone_file, **meta.model_kwargs)
        if any(found.model_kwargs.get(k) != meta.model_kwargs.get(k) for k in ("embed_dim", "depth", "patch_size")):
            raise DinoscopeError(
                f"the referenced backbone {backbone_file} no longer matches the one the head was fitted on",
                path=path,
                field="backbone_path",
                fix="restore the original backbone file or refit the head",
            )
    else:
        backbone = VisionTransformer(**meta.model_kwargs)
        strict_load(backbone, strip_prefix(tensors, "backbone."), path)
    model = backbone_head_model(
        backbone,
        meta,
        spec["head"]["type"],
        spec["head"]["kwargs"],
        layers=spec["layers"],
        feature_norm=spec["feature_norm"],
        normaliser=normaliser,
        band_names=sidecar["band_names"],
        metadata=sidecar.get("metadata"),
    )
    model.spec = spec
    strict_load(model.net.head, strip_prefix(tensors, "head."), path)
    leftover = sorted(k for k in tensors if not k.startswith(("head.", "backbone.")))
    if leftover:
        raise DinoscopeError(f"unexpected tensors in the model file: {leftover[:5]}", path=path, field="state_dict")
    return model.to(device).eval()


def _read_model_file(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise DinoscopeError(f"not a readable safetensors file ({err})", path=path, field="model") from None
    side = path.with_suffix(".json")
    try:
        sidecar = json.loads(side.read_text()) if side.exists() else json.loads(header.get("dinoscope_canopy", "{}"))
    except json.JSONDecodeError as err:
        raise DinoscopeError(f"the model sidecar is not valid JSON ({err.msg})", path=side) from None
    if sidecar.get("format") != MODEL_FORMAT:
        raise DinoscopeError(
            "these are backbone weights (or an unknown file), not a fitted canopy model",
            path=path,
            field="model",
            fix="fit a head with `dinoscope canopy fit` and pass its model.safetensors",
        )
    if int(sidecar.get("format_version", 0)) > MODEL_FORMAT_VERSION:
        raise DinoscopeError(
            f"model format_version {sidecar['format_version']} is newer than this dinoscope "
            f"supports ({MODEL_FORMAT_VERSION})",
            path=path,
            field="format_version",
            fix="upgrade dinoscope",
        )
    return sidecar, tensors


def _relative_to(target: Path, base: Path) -> str:
    target, base = target.resolve(), base.resolve()
    try:
        return str(target.relative_to(base))
    except ValueError:
        return str(target)


def _resolve(stored: str, base: Path) -> Path:
    candidate = Path(stored)
    return candidate if candidate.is_absolute() else base / candidate
