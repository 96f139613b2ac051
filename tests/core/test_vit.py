"""Behaviour of the ViT beyond the fixtures: official sizes, SwiGLU, stochastic depth, backends, channels."""

from __future__ import annotations

import pytest
import torch

from core.errors import DinoscopeError
from core.models import VisionTransformer, build_backbone, vit_giant2, vit_small
from core.models.block import add_residual_on_subset


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_official_parameter_counts() -> None:
    hub = {"img_size": 518, "patch_size": 14, "init_values": 1.0, "block_chunks": 0}
    assert _count(vit_small(**hub)) == 22_056_576
    assert _count(vit_small(**hub, num_register_tokens=4)) == 22_056_576 + 1_536


def test_giant_swiglu_layout() -> None:
    # Build on the meta device: shapes only, no 4 GB of memory.
    with torch.device("meta"):
        model = vit_giant2(img_size=518, patch_size=14, init_values=1.0, ffn_layer="swiglufused")
    sd = model.state_dict()
    assert tuple(sd["blocks.0.mlp.w12.weight"].shape) == (8192, 1536)
    assert tuple(sd["blocks.0.mlp.w3.weight"].shape) == (1536, 4096)
    assert _count(model) == 1_136_480_768


def test_backends_agree_and_xformers_falls_back_on_cpu() -> None:
    model = VisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=4, init_values=1.0).eval()
    x = torch.randn(2, 3, 56, 56)
    outs = {}
    for backend in ("sdpa", "math", "xformers", "auto"):
        model.set_attention_backend(backend)
        with torch.no_grad():
            outs[backend] = model(x)
    for backend in ("math", "xformers", "auto"):
        torch.testing.assert_close(outs[backend], outs["sdpa"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown attention backend"):
        model.set_attention_backend("flash9")


def test_efficient_stochastic_depth_keeps_dropped_samples_unchanged() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 5, 4)
    out = add_residual_on_subset(x, lambda t: torch.ones_like(t), drop_rate=0.5)
    changed = (out != x).flatten(1).any(1)
    assert changed.sum() == 4  # int(8 * 0.5) samples run the branch
    torch.testing.assert_close(out[changed], x[changed] + 2.0)  # rescaled by B / kept = 2
    torch.testing.assert_close(out[~changed], x[~changed])


def test_train_mode_drop_path_changes_output_eval_does_not() -> None:
    model = VisionTransformer(
        img_size=28,
        patch_size=14,
        embed_dim=32,
        depth=4,
        num_heads=2,
        init_values=1.0,
        drop_path_rate=0.4,
        drop_path_uniform=True,
    )
    x = torch.randn(4, 3, 28, 28)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    torch.testing.assert_close(a, b)
    model.train()
    with torch.no_grad():
        c = model(x)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("in_chans", [1, 5, 16])
def test_any_channel_count(in_chans: int) -> None:
    model = VisionTransformer(img_size=28, patch_size=14, in_chans=in_chans, embed_dim=32, depth=1, num_heads=2)
    out = model.forward_features(torch.randn(2, in_chans, 42, 28))
    assert out["x_norm_patchtokens"].shape == (2, 6, 32)


def test_input_not_multiple_of_patch_is_a_clear_error() -> None:
    model = VisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        model(torch.randn(1, 3, 30, 28))


def test_list_input_and_backward() -> None:
    model = VisionTransformer(
        img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2, init_values=1e-5, num_register_tokens=2
    )
    outs = model.forward_features(
        [torch.randn(2, 3, 28, 28), torch.randn(3, 3, 14, 14)], masks=[torch.zeros(2, 4, dtype=torch.bool), None]
    )
    assert outs[0]["x_norm_regtokens"].shape == (2, 2, 32) and outs[1]["x_norm_patchtokens"].shape == (3, 1, 32)
    (outs[0]["x_norm_clstoken"].sum() + outs[1]["x_norm_clstoken"].sum()).backward()
    assert model.cls_token.grad is not None and model.mask_token.grad is not None


def test_unknown_backbone_lists_valid_names() -> None:
    with pytest.raises(DinoscopeError, match="vit_small"):
        build_backbone("vit_hyuge")
