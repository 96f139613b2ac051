"""The demo's baselines are what they claim: the scenes need invariances, the random twin is not degenerate, the
statistics backbones read per-channel means, and the kNN comparison scores every method on held-out data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.data.datasets import build_dataset
from core.eval.features import EvalTransform
from core.models.vit import VisionTransformer
from core.report.baselines import knn_comparison, ring_masks, write_random_twin, write_statistics_backbone
from core.weights import WeightMeta, load_backbone, save_backbone


def _backbone(tmp_path: Path, in_chans: int = 3, channel_adaptive: bool = False, patch: int = 4) -> Path:
    """A tiny exported-like backbone (LayerScale 1e-5, as DINOv2 initialises and the demo pretrains)."""
    kwargs = {
        "img_size": 32,
        "patch_size": patch,
        "in_chans": in_chans,
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 4,
        "mlp_ratio": 4.0,
        "init_values": 1e-5,
        "channel_adaptive": channel_adaptive,
    }
    names = ["red", "green", "blue"] if in_chans == 3 else ["DNA"]
    meta = WeightMeta(
        arch="vit_test",
        model_kwargs=kwargs,
        channel_names=names,
        mean=[0.5] * in_chans,
        std=[0.25] * in_chans,
        extra={"input_normalisation": "per_image_zscore"},
    )
    return save_backbone(VisionTransformer(**kwargs), meta, tmp_path / "backbone.safetensors")


def _mean_pairwise_cosine(features: torch.Tensor) -> float:
    unit = F.normalize(features, dim=1)
    sims = unit @ unit.T
    n = len(unit)
    return float((sims.sum() - n) / (n * (n - 1)))


def test_synthetic_scenes_vary_everything_but_the_class() -> None:
    data = build_dataset("synthetic_scenes", n=40, size=48, seed=3, labelled=True)
    again = build_dataset("synthetic_scenes", n=40, size=48, seed=3, labelled=True)
    image, label = data[5]
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8 and label == 1
    assert np.array_equal(image, again[5][0])  # image i depends only on (seed, i)
    assert [data[i][1] for i in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    same_class = np.stack([data[i][0] for i in range(0, 40, 4)]).astype(float)  # ten scenes of class 0
    # Position, size, colour and background differ: the per-pixel spread within one class is large...
    assert same_class.std(0).mean() > 30
    # ...and the objects are lighter than their backgrounds, of any hue.
    assert data[0][0].max() > 140 and len({tuple(data[i][0].reshape(-1, 3).max(0) // 64) for i in range(40)}) > 5


def test_random_twin_keeps_the_architecture_and_depends_on_the_input(tmp_path: Path) -> None:
    like = _backbone(tmp_path)
    twin_path = write_random_twin(like, tmp_path / "twin.safetensors")
    twin, meta = load_backbone(twin_path)
    _, original = load_backbone(like)
    assert {k: v for k, v in meta.model_kwargs.items() if k != "init_values"} == {
        k: v for k, v in original.model_kwargs.items() if k != "init_values"
    }
    assert meta.model_kwargs["init_values"] == 1.0 and meta.extra["baseline"] == "random_twin"
    assert meta.extra["input_normalisation"] == "per_image_zscore"  # read like the pretrained backbone
    scenes = EvalTransform(build_dataset("synthetic_scenes", n=16, size=32, labelled=True), 32, None, None)
    images = torch.stack([scenes[i][0] for i in range(16)])
    degenerate, _ = load_backbone(like)  # untrained with LayerScale 1e-5: the class token ignores the image
    with torch.no_grad():
        flat = 1 - _mean_pairwise_cosine(degenerate.forward_features(images)["x_norm_clstoken"])
        mixed = 1 - _mean_pairwise_cosine(twin.forward_features(images)["x_norm_clstoken"])
    assert flat < 1e-4 and mixed > 0.02  # mean pairwise cosine: ~1.0 against ~0.91


def test_quadrant_statistics_backbone_reads_patch_colour_means(tmp_path: Path) -> None:
    stats_path = write_statistics_backbone(_backbone(tmp_path), tmp_path / "stats.safetensors")
    model, meta = load_backbone(stats_path)
    assert meta.extra["input_normalisation"] == "fixed" and meta.patch_size == 4
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)["x_norm_patchtokens"]  # [2, 64 patches, 64]
    # LayerNorm is linear here up to one shared offset, which an unused dimension (index 20) carries.
    features = tokens[..., :15] - tokens[..., 20:21]
    patch = x[:, :, :4, :4]  # the first patch (token 0)
    expected = torch.stack(
        [
            torch.cat(
                [patch[:, c].mean((1, 2))[:, None], patch[:, c].reshape(2, 2, 2, 2, 2).mean((2, 4)).flatten(1)], 1
            )
            for c in range(3)
        ],
        1,
    ).flatten(1)
    torch.testing.assert_close(features[:, 0], expected, atol=2e-3, rtol=0)


def test_ring_statistics_backbone_reads_radial_profiles_of_one_crop(tmp_path: Path) -> None:
    like = _backbone(tmp_path, in_chans=1, channel_adaptive=True, patch=8)
    stats_path = write_statistics_backbone(like, tmp_path / "rings.safetensors", masks="rings", patch_size=32)
    model, meta = load_backbone(stats_path)
    assert meta.patch_size == 32 and meta.model_kwargs["channel_adaptive"]
    crop = torch.zeros(1, 1, 32, 32)
    crop[..., 12:20, 12:20] = 1.0  # a bright square "nucleus" in the middle
    with torch.no_grad():
        token = model.forward_features(crop)["x_norm_patchtokens"][0, 0]
    rings = (token[:6] - token[30]).numpy()
    masks = ring_masks(32, (0, 3, 6, 9, 12, 16, 23))
    expected = [crop[0, 0].numpy()[m].mean() for m in masks]
    np.testing.assert_allclose(rings, expected, atol=2e-3)
    assert rings[0] == pytest.approx(1.0, abs=2e-3) and rings[-1] == pytest.approx(0.0, abs=2e-3)


def test_knn_comparison_scores_every_method_per_label_budget(tmp_path: Path) -> None:
    like = _backbone(tmp_path)
    twin = write_random_twin(like, tmp_path / "twin.safetensors")
    result = knn_comparison(
        like,
        twin,
        tmp_path / "knn.json",
        train={"n": 40, "size": 32, "seed": 1},
        val={"n": 24, "size": 32, "seed": 2},
        per_class=[2, 10],
    )
    assert json.loads((tmp_path / "knn.json").read_text()) == json.loads(json.dumps(result))
    methods = [(r["method"], r["features"]) for r in result["rows"]]
    assert methods[:4] == [
        ("pretrained", "class token"),
        ("pretrained", "mean patch token"),
        ("random init", "class token"),
        ("random init", "mean patch token"),
    ]
    assert [m for m, _ in methods[4:]] == ["raw pixels", "channel statistics"]
    for row in result["rows"]:
        assert set(row["top1"]) == {"2", "10"}
        assert all(
            0.0 <= v <= 100.0 and (v * 24 / 100) == pytest.approx(round(v * 24 / 100)) for v in row["top1"].values()
        )
    assert result["n_val"] == 24 and result["classes"][0] == "disk_hstripes"
