"""Fixtures shared by the cell-embedding tests: a small synthetic screen and a random bag-of-channels ViT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bio.synthetic import make_plate
from core.models import VisionTransformer
from core.weights import WeightMeta, save_backbone

BOC = dict(
    img_size=32, patch_size=8, in_chans=1, channel_adaptive=True, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0
)


@pytest.fixture(scope="module")
def screen(tmp_path_factory: pytest.TempPathFactory) -> object:
    return make_plate(tmp_path_factory.mktemp("screen"), n_rows=3, n_cols=3, fields=2, size=64, plates=1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    meta = WeightMeta(
        arch="vit_test",
        model_kwargs=BOC,
        channel_names=["channel"],
        mean=[0.0],
        std=[1.0],
        extra={"input_normalisation": "per_image_zscore"},
    )
    return save_backbone(VisionTransformer(**BOC), meta, tmp_path_factory.mktemp("w") / "boc.safetensors")
