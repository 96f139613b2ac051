"""HRCH parity with the official outputs, full-size layouts, strict loading, uncertainty, and the canopy heads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F

from core.cli import main
from core.errors import DinoscopeError
from core.weights.meta import WeightMeta
from geodino.config import CanopyFitRecipe
from geodino.fit import _layers
from geodino.heads import LinearCanopyHead, bin_moments, height_bins
from geodino.hrch import DPTCanopyHead, build_hrch, infer_hrch_config, load_hrch
from geodino.hrch_checkpoints import PUBLIC_HRCH
from geodino.model import load_canopy_model, save_canopy_model
from geodino.prediction import predict_files

DATA = Path(__file__).parents[1] / "data"
FX = torch.load(DATA / "hrch_reference" / "hrch_small.pt", weights_only=True)
OSBS = DATA / "real" / "OSBS_029.tif"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The fixture was computed with one thread; one thread also avoids oversubscribing a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _our_outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor the fixture stores, computed by our model under the fixture's names."""
    captured: dict[str, torch.Tensor] = {}
    head = model.decode_head
    hooks = [
        head.reassemble_blocks.register_forward_hook(
            lambda m, i, o: captured.update({f"reassemble_{k}": t for k, t in enumerate(o)})
        )
    ]
    for k in range(4):
        hooks.append(head.convs[k].register_forward_hook(lambda m, i, o, k=k: captured.update({f"convs_{k}": o})))
        hooks.append(
            head.fusion_blocks[k].register_forward_hook(lambda m, i, o, k=k: captured.update({f"fusion_{k}": o}))
        )
    with torch.no_grad():
        out = model(x)
        features = model.features(x)
        padded = F.pad(x, (0, -x.shape[-1] % 16, 0, -x.shape[-2] % 16))
        tokens = model.backbone.prepare_tokens_with_masks(padded)
        pos = model.backbone.interpolate_pos_encoding(torch.zeros_like(tokens[:1]), *padded.shape[-2:])
    for hook in hooks:
        hook.remove()
    captured.update(
        height_m=out["height"][:, None],
        decode_head_out=out["height"][:, None] / 10,
        logits_sub=out["logits"][:, :, ::8, ::8],
        tokens_after_embed=tokens,
        pos_embed_interp=pos,
    )
    for k, (patch, cls) in enumerate(features):
        captured.update({f"backbone_feat_{k}": patch, f"backbone_cls_{k}": cls})
    return captured


@pytest.mark.parametrize("name", ["x", "x_tile", "x_odd"])
def test_hrch_matches_every_stored_official_output(name: str) -> None:
    model = load_hrch(FX)
    assert model.out_indices == [1, 3, 5, 7]
    stored = FX["outputs"][name]
    ours = _our_outputs(model, FX["inputs"][name])
    assert set(stored) <= set(ours), f"not compared: {set(stored) - set(ours)}"
    assert tuple(ours["height_m"].shape) == tuple(FX["output_shapes"][name])
    for key, expected in stored.items():
        atol = 1e-4 if key == "height_m" else 1e-5
        torch.testing.assert_close(ours[key], expected, atol=atol, rtol=1e-5, msg=f"{name}: {key}")


def test_uncertainty_is_the_std_of_the_official_bin_distribution() -> None:
    model = load_hrch(FX)
    with torch.no_grad():
        out = model(FX["inputs"]["x"])
    logits = FX["outputs"]["x"]["logits_sub"]  # raw logits at [::8, ::8]
    p = (torch.relu(logits) + 0.1) / (torch.relu(logits) + 0.1).sum(1, keepdim=True)
    metres = FX["bins"] * 10
    mean = torch.einsum("bkhw,k->bhw", p, metres)
    std = torch.sqrt(torch.einsum("bkhw,k->bhw", p, metres**2) - mean**2)
    torch.testing.assert_close(out["height"][:, ::8, ::8], mean, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out["std"][:, ::8, ::8], std, atol=1e-3, rtol=1e-4)
    assert float(std.min()) > 20  # random weights: nearly uniform bins, std near 100 / sqrt(12) m


@pytest.mark.parametrize("size", ["huge", "large"])
def test_infers_real_checkpoint_layouts(size: str) -> None:
    shapes = FX[f"key_shapes_full_{size}"]
    config = infer_hrch_config(shapes)
    expected = {
        "huge": (1280, 32, 20, [9, 16, 22, 29], [160, 320, 640, 1280]),
        "large": (1024, 24, 16, [4, 11, 17, 23], [128, 256, 512, 1024]),
    }[size]
    b = config["backbone"]
    assert (
        b["embed_dim"],
        b["depth"],
        b["num_heads"],
        config["out_indices"],
        config["head"]["post_process_channels"],
    ) == expected
    assert config["head"]["channels"] == 256 and config["head"]["n_bins"] == 256
    with torch.device("meta"):  # full size without allocating 2.7 GB
        model = build_hrch(config)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: list(v) for k, v in shapes.items()}
    assert sum(v.numel() for v in model.parameters()) == FX["full_nparams"][size]


def test_strict_loading_names_the_problem(tmp_path: Path) -> None:
    sd = dict(FX["state_dict"])
    missing = {k: v for k, v in sd.items() if k != "decode_head.project.conv.bias"}
    blocks = {"num_heads": 4, "out_indices": [1, 3, 5, 7]}  # a reduced layout: not one of the public checkpoints
    with pytest.raises(DinoscopeError, match="decode_head.project.conv.bias"):
        load_hrch(missing, **blocks)
    with pytest.raises(DinoscopeError, match="chm_module_.extra"):
        load_hrch({**sd, "chm_module_.extra": torch.zeros(1)}, **blocks)
    wrapped = load_hrch({f"chm_module_.{k}": v for k, v in sd.items()}, **blocks)  # geoai's wrapper prefix
    assert torch.equal(wrapped.decode_head.project.conv.bias, sd["decode_head.project.conv.bias"])
    quantised = {**sd, "backbone.blocks.0.attn.qkv.zero_point": torch.zeros(1)}
    with pytest.raises(DinoscopeError, match="quantised"):
        load_hrch(quantised, **blocks)
    bare = tmp_path / "backbone_only.pth"
    torch.save({k: v for k, v in sd.items() if k.startswith("backbone.")}, bare)
    with pytest.raises(DinoscopeError, match="canopy fit") as err:
        load_canopy_model(bare)
    assert str(bare) in str(err.value)
    mis = {**sd, "decode_head.convs.0.conv.weight": torch.zeros(32, 13, 3, 3)}
    with pytest.raises(DinoscopeError, match="mis-shaped"):
        load_hrch(mis, **blocks)


def test_hrch_checkpoint_is_a_canopy_model_that_crops_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "hrch_small.pt"
    torch.save(FX, path)  # the fixture file itself: {"config", "state_dict", ...}
    model = load_canopy_model(path)  # num_heads and out_indices come from the embedded config
    assert model.band_names == ["red", "green", "blue"] and model.normaliser.offset[0] == pytest.approx(0.43 * 255)
    x = FX["inputs"]["x_odd"]  # 50 x 70: HRCH returns 64 x 96; the canopy model crops back to the input
    out = model.predict_batch(x)
    assert out["height"].shape == (1, 50, 70)
    torch.testing.assert_close(out["height"], FX["outputs"]["x_odd"]["height_m"][:, 0, :50, :70], atol=1e-4, rtol=0)
    again = load_canopy_model(save_canopy_model(model, tmp_path / "hrch.safetensors"))
    assert torch.equal(again.predict_batch(x)["std"], out["std"])


def _random_fixture_layout(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=gen) * (0.05 if v.ndim > 1 else 0.01)
        + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
        for k, v in FX["state_dict"].items()
    }


def test_random_hrch_checkpoint_predicts_real_orthophoto_on_its_grid(tmp_path: Path) -> None:
    ckpt = tmp_path / "hrch_random.pth"
    torch.save({"state_dict": _random_fixture_layout()}, ckpt)  # exactly the official layout, fresh weights
    out = tmp_path / "osbs_chm.tif"
    with pytest.raises(DinoscopeError, match="not one of the public ones") as err:  # blocks are never guessed
        predict_files(ckpt, [OSBS], out, num_heads=4, device="cpu", progress=False)
    assert "--hrch-blocks" in err.value.fix and not out.exists()
    written = predict_files(
        ckpt, [OSBS], out, uncertainty=True, num_heads=4, hrch_blocks=[1, 3, 5, 7], device="cpu", progress=False
    )
    assert written == [out]
    with rasterio.open(OSBS) as src, rasterio.open(out) as pred, rasterio.open(tmp_path / "osbs_chm_std.tif") as sd:
        assert (pred.crs, pred.transform, pred.width, pred.height) == (src.crs, src.transform, src.width, src.height)
        assert (sd.crs, sd.transform, sd.shape) == (src.crs, src.transform, src.shape)
        heights, std = pred.read(1), sd.read(1)
        assert pred.dtypes[0] == "float32" and np.isnan(pred.nodata)
        input_nodata = src.dataset_mask() == 0
    assert input_nodata.sum() == 461  # pixels where all three bands are 255 (1,665 more have one or two at 255)
    np.testing.assert_array_equal(np.isnan(heights), input_nodata)
    assert np.isfinite(heights[~input_nodata]).all() and (heights[~input_nodata] > 0).all()
    assert (std[~input_nodata] > 0).all()


def test_bin_moments_rules() -> None:
    bins = height_bins(5, 0.0, 40.0)  # 0, 10, 20, 30, 40
    peaked = torch.full((1, 5, 1, 1), -50.0)
    peaked[0, 3] = 50.0
    mean, std = bin_moments(peaked, bins, "softmax")
    assert float(mean) == pytest.approx(30.0) and float(std) == pytest.approx(0.0, abs=1e-3)
    for rule in ("softmax", "relu_eps"):  # all-zero / all-negative logits: the uniform distribution
        mean, std = bin_moments(torch.full((2, 5, 3, 4), -1.0 if rule == "relu_eps" else 0.0), bins, rule)
        assert torch.allclose(mean, torch.full((2, 3, 4), 20.0))
        assert torch.allclose(std, torch.full((2, 3, 4), float(np.std([0, 10, 20, 30, 40]))))
    with pytest.raises(ValueError, match="unknown bin rule"):
        bin_moments(peaked, bins, "sigmoid")


@torch.no_grad()
def test_linear_head_shapes_modes_and_cls_tokens() -> None:
    features = [(torch.randn(2, 8, 4, 5), torch.randn(2, 8)) for _ in range(3)]
    head = LinearCanopyHead(embed_dim=8, n_layers=3, n_bins=16, max_height=30.0, upsample=2)
    assert head.conv.in_channels == 8 * 3 * 2
    out = head(features, (32, 40))
    assert out["height"].shape == (2, 32, 40) and out["std"].shape == (2, 32, 40)
    assert float(out["height"].min()) >= 0.0 and float(out["height"].max()) <= 30.0
    regression = LinearCanopyHead(embed_dim=8, n_layers=3, mode="regression", use_cls_token=False)
    out = regression(features, (32, 40))
    assert set(out) == {"height"} and out["height"].shape == (2, 32, 40) and not regression.has_std
    # The class token is broadcast: changing it shifts every pixel's logits alike.
    changed = [(p, c + 1.0) for p, c in features]
    assert not torch.allclose(head(changed, (32, 40))["height"], head(features, (32, 40))["height"])


@torch.no_grad()
def test_light_dpt_head_reaches_the_pixel_grid() -> None:
    head = DPTCanopyHead(embed_dim=16, channels=8, n_bins=32, max_height=50.0)
    features = [(torch.randn(1, 16, 3, 5), torch.randn(1, 16)) for _ in range(4)]
    out = head(features, (24, 40))  # patch 8: 3 x 5 patches
    assert out["height"].shape == (1, 24, 40) and out["std"].shape == (1, 24, 40)
    assert torch.isfinite(out["height"]).all() and float(out["std"].min()) > 0


def test_public_checkpoints_carry_their_heads_and_decoder_blocks_and_others_are_never_guessed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for size, blocks in (("huge", [9, 16, 22, 29]), ("large", [4, 11, 17, 23])):
        config = infer_hrch_config(FX[f"key_shapes_full_{size}"])  # no num_heads, no out_indices given
        assert config["public"] == size and config["out_indices"] == blocks
    assert [(c.size, c.num_heads) for c in PUBLIC_HRCH] == [("huge", 20), ("large", 16)]
    # A 12-block layout (not public): evenly spaced blocks would be [2, 5, 8, 11]; it must be told its own.
    shapes = {k: v for k, v in FX["key_shapes_full_large"].items() if not k.startswith("backbone.blocks.")}
    shapes |= {
        k: v
        for k, v in FX["key_shapes_full_large"].items()
        if k.startswith(tuple(f"backbone.blocks.{i}." for i in range(12)))
    }
    with pytest.raises(DinoscopeError, match="not one of the public ones") as err:
        infer_hrch_config(shapes)
    assert "--hrch-blocks 2,5,8,11" in err.value.fix
    assert infer_hrch_config(shapes, out_indices=[2, 5, 8, 10])["out_indices"] == [2, 5, 8, 10]

    meta = WeightMeta(
        "custom",
        {"embed_dim": 1280, "depth": 32, "patch_size": 16},
        ["r", "g", "b"],
        [0.4] * 3,
        [0.2] * 3,
        source_format="hrch",
    )
    assert _layers(CanopyFitRecipe(), meta) == [9, 16, 22, 29]  # a fit on the HRCH backbone reads the same blocks

    path = tmp_path / "hrch_small.pt"
    torch.save(FX, path)
    assert main(["canopy", "inspect", str(OSBS), "--model", str(path)]) == 0
    text = capsys.readouterr().out
    assert "public: no, heads 4, decoder blocks [1, 3, 5, 7]" in text and "inputs    uint8, values 0..255" in text
    assert "would accept" in text and "pixel size: 0.1 m, but the model was trained at 0.6 m" in text
