"""Parity of our ViT and DINOHead with the official DINOv2 numbers (tests/data/dinov2_reference).

The tests loop over every fixture file and dispatch on the file's own ``config``, so any further fixture produced
by the official code in the same format is checked too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from core.models import DINOHead, VisionTransformer, linear_input

REF = Path(__file__).parents[1] / "data" / "dinov2_reference"
ATOL = RTOL = 1e-5


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _fixtures(kind: str) -> list[Path]:
    out = []
    for path in sorted(REF.glob("*.pt")):
        cfg = _load(path).get("config", {})
        if (
            kind == "vit"
            and "embed_dim" in cfg
            and not cfg.get("channel_adaptive")
            or kind == "boc"
            and cfg.get("channel_adaptive")
            or kind == "head"
            and "bottleneck_dim" in cfg
        ):
            out.append(path)
    return out


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def _model(fx: dict) -> VisionTransformer:
    model = VisionTransformer(**fx["config"]).eval()
    # Exact key set and shapes, then strict load.
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in fx["state_dict"].items()}
    assert ours == theirs
    if "state_dict_at_init" in fx:
        assert list(model.state_dict()) == list(fx["state_dict_at_init"])  # same key order as upstream
    model.load_state_dict(fx["state_dict"], strict=True)
    return model


def test_fixture_discovery_finds_all_kinds() -> None:
    assert len(_fixtures("vit")) >= 2 and _fixtures("boc") and _fixtures("head")


@pytest.mark.parametrize("path", _fixtures("vit"), ids=lambda p: p.stem)
def test_vit_outputs_match_official(path: Path) -> None:
    fx = _load(path)
    model = _model(fx)
    checked = 0
    with torch.no_grad():
        for name, expected in fx["outputs"].items():
            masked = name.endswith("_masked")
            base = name[: -len("_masked")] if masked else name
            x = fx["inputs"][base]
            masks = fx["inputs"][f"masks_{base}"] if masked else None
            feats = model.forward_features(x, masks=masks)
            for key, value in expected.items():
                where = f"{path.stem}/{name}/{key}"
                if key in feats:
                    _close(feats[key], value, where)
                elif key == "forward":
                    _close(model(x), value, where)
                elif key == "prepared_tokens":
                    _close(model.prepare_tokens_with_masks(x, masks), value, where)
                elif key == "pos_embed_interpolated":
                    n = value.shape[1]
                    _close(
                        model.interpolate_pos_encoding(torch.zeros(1, n, value.shape[2]), *x.shape[-2:]), value, where
                    )
                elif m := re.fullmatch(r"gil_n(\d+)_(patch|cls)_(\d+)", key):
                    outs = model.get_intermediate_layers(x, n=int(m[1]), reshape=True, return_class_token=True)
                    _close(outs[int(m[3])][0 if m[2] == "patch" else 1], value, where)
                elif m := re.fullmatch(r"gil_list(\d+)_nonorm", key):
                    _close(model.get_intermediate_layers(x, n=[int(m[1])], norm=False)[0], value, where)
                else:
                    raise AssertionError(f"unhandled fixture output {where}")
                checked += 1
    assert checked >= 30


@pytest.mark.parametrize("path", _fixtures("boc"), ids=lambda p: p.stem)
def test_bag_of_channels_matches_official(path: Path) -> None:
    fx = _load(path)
    model = _model(fx)
    n = fx["n_last_blocks"]
    x = fx["inputs"]["x"]
    out = fx["outputs"]
    with torch.no_grad():
        layers = model.get_intermediate_layers(x, n, return_class_token=True)
        for i, (patch, cls) in enumerate(layers):
            _close(patch, out[f"gil_patch_{i}"], f"gil_patch_{i}")
            _close(cls, out[f"gil_cls_{i}"], f"gil_cls_{i}")
        _close(linear_input(layers, n_last_blocks=n, avgpool=True), out["linear_input_avgpool"], "avgpool input")
        _close(linear_input(layers, n_last_blocks=n, avgpool=False), out["linear_input_no_avgpool"], "no avgpool")
        _close(F.normalize(layers[-1][1], dim=-1), out["knn_feature_l2norm"], "knn feature")
        # Each channel encoded alone by the same single-channel model gives the same class tokens.
        B, C, H, W = x.shape
        model.bag_of_channels = False
        plain = model.get_intermediate_layers(x.reshape(B * C, 1, H, W), n, return_class_token=True)
        _close(plain[-1][1].reshape(B, -1), out[f"gil_cls_{n - 1}"], "per-channel equivalence")


@pytest.mark.parametrize("path", _fixtures("head"), ids=lambda p: p.stem)
def test_dino_head_matches_official(path: Path) -> None:
    fx = _load(path)
    head = DINOHead(**fx["config"]).eval()
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {
        k: tuple(v.shape) for k, v in fx["state_dict"].items()
    }
    init = fx["state_dict_at_init"]
    assert torch.equal(head.state_dict()["last_layer.weight_g"], init["last_layer.weight_g"])  # g starts at 1
    head.load_state_dict(fx["state_dict"], strict=True)
    x = fx["inputs"]["x"]
    with torch.no_grad():
        _close(head(x), fx["outputs"]["out"], "out")
        _close(F.normalize(head.mlp(x), dim=-1, eps=1e-12), fx["outputs"]["bottleneck_normalized"], "bottleneck")
        _close(head.last_layer.weight, fx["outputs"]["last_layer_effective_weight"], "effective weight")
