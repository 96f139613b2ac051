"""Shared test fixtures: data paths, deterministic seeds, no network, no progress bars."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"
DINOV2_REF = DATA / "dinov2_reference"
HRCH_REF = DATA / "hrch_reference"
REAL = DATA / "real"

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DINOSCOPE_NO_PROGRESS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a socket to a non-local address fails the test."""
    import socket

    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> object:
        host = address[0] if isinstance(address, tuple) else address
        if (
            isinstance(host, str)
            and not (host.startswith("127.") or host in ("localhost", "::1"))
            and self.family in (socket.AF_INET, socket.AF_INET6)
        ):
            raise RuntimeError(f"test tried to reach the network: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="session")
def make_tiny_models():
    """A function ``folder -> {"weights", "canopy"}`` writing a tiny 3-channel ViT export (channels DNA, RNA, ER)
    and a random canopy model (RGB uint8 input record) into ``folder``; quick enough for per-test inputs."""
    from core.models import VisionTransformer
    from core.weights import WeightMeta, save_backbone
    from geodino.model import backbone_head_model, random_backbone, save_canopy_model
    from geodino.normalise import BandNormaliser
    from geodino.values import InputRecord

    def make(folder: Path) -> dict[str, Path]:
        torch.manual_seed(0)
        kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, in_chans=3)
        meta = WeightMeta(
            arch="vit_test", model_kwargs=kwargs, channel_names=["DNA", "RNA", "ER"], mean=[0.5] * 3, std=[0.2] * 3
        )
        weights = save_backbone(VisionTransformer(**kwargs), meta, folder / "vit.safetensors")
        backbone, vit_meta = random_backbone("vit_test", 8, 32)
        canopy = backbone_head_model(
            backbone,
            vit_meta,
            "linear",
            {"embed_dim": 64, "n_layers": 2, "n_bins": 32, "max_height": 40.0, "bin_rule": "softmax"},
            layers=[0, 1],
            feature_norm=False,
            normaliser=BandNormaliser([100.0] * 3, [50.0] * 3),
            band_names=["red", "green", "blue"],
            metadata={"gsd_m": 0.5, "input": InputRecord("uint8", (0.0, 255.0)).to_dict()},
        )
        return {"weights": weights, "canopy": save_canopy_model(canopy, folder / "canopy.safetensors")}

    return make
