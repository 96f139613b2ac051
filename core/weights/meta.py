"""Metadata that travels with backbone weights.

Every exported backbone is a safetensors file plus a JSON sidecar holding a :class:`WeightMeta`. Readers use it to
rebuild the exact architecture and to feed the model correctly normalised channels, in the right order.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from core.errors import DinoscopeError

FORMAT_VERSION = 1

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class WeightMeta:
    """Architecture, channels and normalisation of a backbone checkpoint.

    Attributes:
        arch: factory name (``vit_small`` ...) or ``custom`` when no factory matches the shapes.
        model_kwargs: the complete :class:`core.models.VisionTransformer` constructor keywords.
        channel_names: one name per input channel, in the order the model expects them.
        mean, std: per-channel normalisation applied to inputs scaled to [0, 1].
        source_format: the checkpoint family the weights were read from (see ``core.weights.formats``).
        format_version: version of this sidecar layout.
        extra: free-form provenance (recipe, git sha, training iteration, ...).
    """

    arch: str
    model_kwargs: dict[str, Any]
    channel_names: list[str]
    mean: list[float]
    std: list[float]
    source_format: str = "dinoscope"
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def patch_size(self) -> int:
        """Patch side in pixels."""
        return int(self.model_kwargs["patch_size"])

    @property
    def embed_dim(self) -> int:
        """Token width ``D``."""
        return int(self.model_kwargs["embed_dim"])

    @property
    def in_chans(self) -> int:
        """Number of input channels."""
        return int(self.model_kwargs["in_chans"])

    @property
    def num_register_tokens(self) -> int:
        """Register tokens (Darcet et al. 2023, arXiv:2309.16588); 0 when absent."""
        return int(self.model_kwargs.get("num_register_tokens", 0))

    @property
    def channel_adaptive(self) -> bool:
        """Whether the backbone embeds each channel on its own (bag of channels, Cell-DINO)."""
        return bool(self.model_kwargs.get("channel_adaptive", False))

    def to_dict(self) -> dict[str, Any]:
        """Every field as a JSON-ready dict (the sidecar's content)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str | os.PathLike | None = None) -> WeightMeta:
        """A validated :class:`WeightMeta` from a sidecar dict; unknown or missing keys, or a newer ``format_version``,
        raise :class:`~core.errors.DinoscopeError` naming ``path``.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(n for n in ("arch", "model_kwargs", "channel_names", "mean", "std") if n not in data)
        if unknown or missing:
            raise DinoscopeError(
                f"weights sidecar has unknown keys {unknown} / missing keys {missing}",
                path=path,
                field=(unknown or missing)[0],
                fix=f"the sidecar keys are {sorted(names)}",
            )
        version = int(data.get("format_version", FORMAT_VERSION))
        if version > FORMAT_VERSION:
            raise DinoscopeError(
                f"sidecar format_version {version} is newer than this dinoscope supports ({FORMAT_VERSION})",
                path=path,
                field="format_version",
                fix="upgrade dinoscope",
            )
        meta = cls(**data)
        meta.validate(path)
        return meta

    def validate(self, path: str | os.PathLike | None = None) -> None:
        """Require one ``channel_names``/``mean``/``std`` entry per input channel and ``std > 0``; raises
        :class:`~core.errors.DinoscopeError` naming ``path``.
        """
        c = self.in_chans
        for name in ("channel_names", "mean", "std"):
            if len(getattr(self, name)) != c:
                raise DinoscopeError(
                    f"{name} has {len(getattr(self, name))} entries but the model takes {c} input channels",
                    path=path,
                    field=name,
                    fix=f"give exactly {c} values, one per channel",
                )
        if any(s <= 0 for s in self.std):
            raise DinoscopeError("std values must be positive", path=path, field="std")


def sidecar_path(weights_path: str | os.PathLike) -> Path:
    """``model.safetensors`` -> ``model.json``."""
    return Path(weights_path).with_suffix(".json")


def read_sidecar(path: str | os.PathLike) -> WeightMeta:
    """Read and validate a JSON sidecar; a missing or malformed file raises ``DinoscopeError``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DinoscopeError(
            "the JSON sidecar of these weights is missing",
            path=path,
            fix="keep the .json written by `dinoscope weights convert` or `dinoscope export` "
            "next to the .safetensors file",
        ) from None
    except json.JSONDecodeError as err:
        raise DinoscopeError(f"the sidecar is not valid JSON ({err.msg} at line {err.lineno})", path=path) from None
    return WeightMeta.from_dict(data, path)


def default_channel_names(in_chans: int) -> list[str]:
    """``red, green, blue`` for 3 channels, else ``ch0 .. ch{n-1}``."""
    if in_chans == 3:
        return ["red", "green", "blue"]
    return [f"ch{i}" for i in range(in_chans)]


def default_normalisation(in_chans: int) -> tuple[list[float], list[float]]:
    """ImageNet statistics for RGB, 0.5/0.25 otherwise (inputs scaled to [0, 1])."""
    if in_chans == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [0.5] * in_chans, [0.25] * in_chans
