"""One backbone call over a list of crop sets (DINOv2's global + local crops): same numbers, one call per module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.models import VisionTransformer
from core.models.block import Block, DropPath, add_residual_on_subset, add_residual_on_subsets, pack_tokens

KEYS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")


def _model(registers: int = 0, **kw: object) -> VisionTransformer:
    torch.manual_seed(0)
    kw = {
        "img_size": 28,
        "patch_size": 14,
        "embed_dim": 32,
        "depth": 3,
        "num_heads": 2,
        "init_values": 0.5,
        "num_register_tokens": registers,
        "attn_backend": "sdpa",
        **kw,
    }
    return VisionTransformer(**kw)


def _crops() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global crops with masks (3x3 patches, pos-embed interpolated) and local crops of another size and batch."""
    g = torch.randn(4, 3, 42, 42, generator=torch.Generator().manual_seed(1))
    loc = torch.randn(6, 3, 28, 14, generator=torch.Generator().manual_seed(2))
    mask = torch.rand(4, 9, generator=torch.Generator().manual_seed(3)) < 0.4
    return g, loc, mask


def _loss(outs: list[dict]) -> torch.Tensor:
    # Fixed random weights: a plain sum of LayerNorm outputs would have almost no gradient.
    gen = torch.Generator().manual_seed(4)
    total = torch.zeros(())
    for out in outs:
        for key in KEYS:
            total = total + (out[key].float() * torch.randn(out[key].shape, generator=gen)).sum()
    return total


def _grads(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("registers", [0, 2])
def test_list_equals_separate_calls_outputs_and_gradients(registers: int) -> None:
    model = _model(registers)
    g, loc, mask = _crops()
    packed = model.forward_features([g, loc], [mask, None])
    alone = [model.forward_features(g, mask), model.forward_features(loc)]
    assert len(packed) == 2 and packed[0]["masks"] is mask and packed[1]["masks"] is None
    for got, want in zip(packed, alone, strict=True):
        assert set(got) == set(want)
        for key in KEYS:
            assert got[key].shape == want[key].shape
            torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0)
    grads_packed = _grads(model, _loss(packed))
    grads_alone = _grads(model, _loss(alone))
    assert set(grads_packed) == set(grads_alone) == {n for n, _ in model.named_parameters()}
    for name, grad in grads_alone.items():
        # A weight gradient sums over all token rows, once over the packed rows or once per set and then added:
        # the summation order differs, so agreement is to fp32 rounding of the gradient's own scale.
        atol = 1e-6 * max(1.0, grad.abs().max().item())
        torch.testing.assert_close(grads_packed[name], grad, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_list_equals_separate_calls_under_bf16_autocast() -> None:
    model = _model(2)
    g, loc, mask = _crops()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed = model.forward_features([g, loc], [mask, None])
        alone = [model.forward_features(g, mask), model.forward_features(loc)]
    for got, want in zip(packed, alone, strict=True):
        for key in KEYS:
            assert got[key].dtype == want[key].dtype
            torch.testing.assert_close(got[key].float(), want[key].float(), atol=2e-2, rtol=2e-2)


def test_blocks_accept_lists_directly() -> None:
    block = _model().blocks[1]
    xs = [torch.randn(3, 7, 32), torch.randn(5, 2, 32)]
    outs = block(xs)
    for got, x in zip(outs, xs, strict=True):
        torch.testing.assert_close(got, block(x), atol=1e-6, rtol=0)


def test_single_element_list_equals_tensor_call() -> None:
    model = _model(2).eval()
    g, _, mask = _crops()
    with torch.no_grad():
        (packed,) = model.forward_features([g], [mask])
        alone = model.forward_features(g, mask)
        for key in KEYS:
            torch.testing.assert_close(packed[key], alone[key], atol=1e-6, rtol=0)
        (cls,) = model([g], [mask])  # not training: head(class token) per element
        torch.testing.assert_close(cls, model(g, mask), atol=1e-6, rtol=0)


@pytest.mark.parametrize("rate", [0.05, 0.5])  # plain DropPath (<= 0.1) and the efficient subset path
def test_single_element_list_equals_tensor_call_in_training_with_same_seed(rate: float) -> None:
    # One set draws its random numbers in the same order and shapes as the tensor call.
    model = _model(1, drop_path_rate=rate, drop_path_uniform=True).train()
    g, _, mask = _crops()
    torch.manual_seed(5)
    (packed,) = model.forward_features([g], [mask])
    torch.manual_seed(5)
    alone = model.forward_features(g, mask)
    for key in KEYS:
        torch.testing.assert_close(packed[key], alone[key], atol=1e-6, rtol=0)


def test_each_parameter_module_called_once_per_forward() -> None:
    model = _model(2)
    owners = {name or "<root>": m for name, m in model.named_modules() if any(True for _ in m.parameters(False))}
    assert {"<root>", "patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.ls2", "blocks.2.mlp.fc2", "norm"} <= set(
        owners
    )
    counts: dict[str, int] = dict.fromkeys(owners, 0)
    handles = [
        m.register_forward_pre_hook(lambda *_, n=name: counts.__setitem__(n, counts[n] + 1))
        for name, m in owners.items()
    ]
    g, loc, mask = _crops()
    try:
        model(g, masks=mask, is_training=True)
        single = dict(counts)
        counts.update(dict.fromkeys(owners, 0))
        model([g, loc], masks=[mask, None], is_training=True)
        packed = dict(counts)
    finally:
        for h in handles:
            h.remove()
    assert single == packed == dict.fromkeys(owners, 1)


def test_subset_stochastic_depth_per_set() -> None:
    torch.manual_seed(0)
    shapes = [(8, 5), (3, 3)]
    x, _ = pack_tokens([torch.randn(b, n, 4) for b, n in shapes])
    seen = []

    def branch(rows: torch.Tensor, kept_shapes: list[tuple[int, int]]) -> torch.Tensor:
        seen.append(list(kept_shapes))
        return torch.ones_like(rows)

    out = add_residual_on_subsets(x, shapes, branch, drop_rate=0.5)
    assert seen == [[(4, 5), (1, 3)]]  # int(B * 0.5) kept per set, at least one; a single branch call
    offset = 0
    for (b, n), kept, alpha in zip(shapes, (4, 1), (2.0, 3.0), strict=True):
        xi, oi = x[offset : offset + b * n].view(b, n, 4), out[offset : offset + b * n].view(b, n, 4)
        changed = (oi != xi).flatten(1).any(1)
        assert changed.sum() == kept
        torch.testing.assert_close(oi[changed], xi[changed] + alpha)  # residual rescaled by B / kept
        torch.testing.assert_close(oi[~changed], xi[~changed])  # dropped samples untouched
        offset += b * n


def test_subset_stochastic_depth_single_set_matches_tensor_function() -> None:
    x = torch.randn(6, 5, 4)
    w = torch.randn(4, 4)
    torch.manual_seed(7)
    want = add_residual_on_subset(x, lambda t: t @ w, drop_rate=0.4)
    torch.manual_seed(7)
    got = add_residual_on_subsets(x.reshape(30, 4), [(6, 5)], lambda t, _: t @ w, drop_rate=0.4)
    torch.testing.assert_close(got.view(6, 5, 4), want, atol=1e-6, rtol=0)


def test_drop_path_on_packed_rows_is_per_sample() -> None:
    torch.manual_seed(0)
    shapes = [(64, 3), (32, 2)]
    drop = DropPath(0.5).train()
    out = drop(torch.ones(64 * 3 + 32 * 2, 4), seq_shapes=shapes)
    offset = 0
    for b, n in shapes:
        per_sample = out[offset : offset + b * n].view(b, n * 4)
        assert (per_sample == per_sample[:, :1]).all()  # the whole sample is kept or dropped
        assert set(per_sample[:, 0].tolist()) == {0.0, 2.0}  # kept samples rescaled by 1 / keep
        offset += b * n


@pytest.mark.parametrize("rate", [0.05, 0.5])
def test_training_with_stochastic_depth_on_a_list(rate: float) -> None:
    model = _model(2, drop_path_rate=rate, drop_path_uniform=True).train()
    assert all(isinstance(b, Block) for b in model.blocks)
    g, loc, mask = _crops()
    outs = model([g, loc], masks=[mask, None], is_training=True)
    assert outs[0]["x_norm_patchtokens"].shape == (4, 9, 32) and outs[1]["x_norm_patchtokens"].shape == (6, 2, 32)
    assert outs[0]["x_norm_regtokens"].shape == (4, 2, 32) and outs[1]["x_norm_clstoken"].shape == (6, 32)
    grads = _grads(model, _loss(outs))
    assert set(grads) == {n for n, _ in model.named_parameters()}
    assert all(torch.isfinite(grad).all() for grad in grads.values())


def test_mismatched_masks_are_a_clear_error() -> None:
    model = _model()
    g, loc, mask = _crops()
    with pytest.raises(ValueError, match="masks must be None or a list of 2"):
        model.forward_features([g, loc], [mask])
    with pytest.raises(ValueError, match="masks must be None or a list"):
        model.forward_features([g, loc], mask)
