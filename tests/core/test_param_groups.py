"""Parameter groups: exact parity with the official DINOv2 multipliers, fusing, and applying schedule values.

The ViT is not needed: a stand-in module tree is built whose parameter names are exactly the fixture's names.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from core.train import apply_optim_schedule, fuse_params_groups, get_params_groups_with_decay
from core.train.param_groups import block_index

FIXTURE = Path(__file__).parents[1] / "data" / "dinov2_reference" / "param_groups.pt"


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def module_with_names(names: list[str]) -> nn.Module:
    """Nested empty modules whose ``named_parameters()`` yields ``names`` in order."""
    root = nn.Module()
    for name in names:
        *path, leaf = name.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, nn.Parameter(torch.zeros(2)))
    return root


@pytest.mark.parametrize("module_name", ["backbone_block_chunks_0", "backbone_block_chunks_2", "dino_head"])
def test_multipliers_match_official_for_every_name(reference: dict, module_name: str) -> None:
    expected = reference["outputs"][module_name]
    cfg = reference["config"]
    model = module_with_names(list(expected))
    groups = get_params_groups_with_decay(
        model, lr_decay_rate=cfg["lr_decay_rate"], patch_embed_lr_mult=cfg["patch_embed_lr_mult"]
    )
    assert [g["name"] for g in groups] == list(expected)
    params = dict(model.named_parameters())
    for group in groups:
        actual = torch.tensor(
            [group["lr_multiplier"], group["wd_multiplier"], float(group["is_last_layer"])], dtype=torch.float64
        )
        torch.testing.assert_close(actual, expected[group["name"]], atol=0, rtol=0, msg=group["name"])
        assert group["params"] is params[group["name"]]


def test_fuse_groups_partitions_parameters(reference: dict) -> None:
    expected = reference["outputs"]["backbone_block_chunks_0"]
    model = module_with_names(list(expected))
    fused = fuse_params_groups(get_params_groups_with_decay(model, lr_decay_rate=0.9, patch_embed_lr_mult=0.2))
    distinct = {tuple(v.tolist()) for v in expected.values()}
    assert len(fused) == len(distinct) == 8
    assert sum(len(g["params"]) for g in fused) == len(expected)
    keys = {(g["lr_multiplier"], g["wd_multiplier"], float(g["is_last_layer"])) for g in fused}
    assert keys == distinct
    tokens = next(g for g in fused if g["lr_multiplier"] == pytest.approx(0.729) and g["wd_multiplier"] == 1.0)
    assert len(tokens["params"]) == 3  # cls_token, pos_embed, mask_token


def test_n_blocks_attribute_wins_and_frozen_and_fsdp_names_are_handled() -> None:
    model = module_with_names(
        ["cls_token", "blocks.0.attn.weight", "_fsdp_wrapped_module.norm.weight", "frozen.weight"]
    )
    model.frozen.weight.requires_grad_(False)
    model.n_blocks = 3
    groups = {g["name"]: g for g in get_params_groups_with_decay(model, lr_decay_rate=0.5)}
    assert set(groups) == {"cls_token", "blocks.0.attn.weight", "norm.weight"}
    assert groups["cls_token"]["lr_multiplier"] == 0.5**4
    assert groups["blocks.0.attn.weight"]["lr_multiplier"] == 0.5**3
    assert groups["norm.weight"]["lr_multiplier"] == 1.0 and groups["norm.weight"]["wd_multiplier"] == 0.0


def test_block_index_parsing() -> None:
    assert block_index("blocks.7.attn.qkv.weight") == 7
    assert block_index("blocks.1.6.attn.qkv.weight") == 6
    assert block_index("backbone.blocks.3.2.mlp.fc1.bias") == 2
    assert block_index("norm.weight") is None
    assert block_index("blocks.0.attn.weight", chunked=True) is None


def test_apply_optim_schedule_sets_lr_and_wd_from_multipliers(reference: dict) -> None:
    head_names = list(reference["outputs"]["dino_head"])
    backbone = module_with_names(list(reference["outputs"]["backbone_block_chunks_2"]))
    head = module_with_names(head_names)
    groups = get_params_groups_with_decay(backbone, 0.9, 0.2) + get_params_groups_with_decay(head)
    optimizer = torch.optim.AdamW(fuse_params_groups(groups), betas=(0.9, 0.999))
    apply_optim_schedule(optimizer, lr=1e-3, wd=0.04, last_layer_lr=0.0)
    for group in optimizer.param_groups:
        base = 0.0 if group["is_last_layer"] else 1e-3
        assert group["lr"] == pytest.approx(base * group["lr_multiplier"])
        assert group["weight_decay"] == pytest.approx(0.04 * group["wd_multiplier"])
    last = [g for g in optimizer.param_groups if g["is_last_layer"]]
    assert len(last) == 1 and len(last[0]["params"]) == 2 and last[0]["lr"] == 0.0
    patch_bias = next(
        g for g in optimizer.param_groups if g["lr_multiplier"] == pytest.approx(0.1458) and g["wd_multiplier"] == 0.0
    )
    assert patch_bias["lr"] == pytest.approx(1.458e-4) and patch_bias["weight_decay"] == 0.0
    plain = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    apply_optim_schedule(plain, lr=0.2, wd=0.3, last_layer_lr=0.0)
    assert plain.param_groups[0]["lr"] == 0.2 and plain.param_groups[0]["weight_decay"] == 0.3
