"""Parity of DINOLoss, iBOTPatchLoss, KoLeoLoss and Sinkhorn-Knopp with the official DINOv2 fixtures.

Each fixture is replayed call by call (the order matters: the center update is lazy) and every stored output is
compared at atol 1e-6; the set of computed keys must equal the stored keys so no output goes unchecked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from core.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss, iBOTPatchLoss, sinkhorn_knopp

DINOV2_REF = Path(__file__).parents[1] / "data" / "dinov2_reference"


def _load(name: str) -> dict:
    return torch.load(DINOV2_REF / name, weights_only=True)


def _assert_all_outputs(computed: dict[str, torch.Tensor], stored: dict[str, torch.Tensor]) -> None:
    assert set(computed) == set(stored)
    for key, expected in stored.items():
        actual = torch.as_tensor(computed[key])
        if expected.dtype in (torch.bool, torch.int64):
            assert torch.equal(actual, expected), key
        else:
            torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def _replay_dino(fx: dict) -> dict[str, torch.Tensor]:
    cfg, inp = fx["config"], fx["inputs"]
    batch, n_local, temp = cfg["B"], cfg["n_local"], cfg["teacher_temp"]
    loss = DINOLoss(cfg["K"], student_temp=cfg["student_temp"], center_momentum=cfg["center_momentum"])
    loss.center.copy_(inp["center0"])
    teacher = inp["teacher_logits_crop_order"]
    out: dict[str, torch.Tensor] = {}
    swapped = torch.cat([teacher[batch:], teacher[:batch]])
    out["teacher_logits_swapped"] = swapped
    out["softmax_center_teacher"] = loss.softmax_center_teacher(swapped, temp)
    loss.update_center(swapped)
    out["center_after_update_before_apply"] = loss.center.clone()
    out["softmax_center_teacher_batch2"] = loss.softmax_center_teacher(inp["teacher2_logits_swapped"], temp)
    out["center_after_apply"] = loss.center.clone()
    loss.apply_center_update()
    out["center_after_second_apply_noop"] = loss.center.clone()
    out["sinkhorn_knopp_teacher"] = loss.sinkhorn_knopp_teacher(swapped, temp, n_iterations=3)
    n_terms = 2 + 2 * n_local
    for tag in ("softmax", "sinkhorn"):
        targets = out[f"{tag}_center_teacher" if tag == "softmax" else "sinkhorn_knopp_teacher"]
        local_raw = loss(inp["student_local_logits"].chunk(n_local), targets.view(2, batch, -1))
        global_raw = loss([inp["student_global_logits"]], [targets])
        out[f"{tag}_loss_forward_local_raw"] = local_raw
        out[f"{tag}_loss_forward_global_raw"] = global_raw
        out[f"{tag}_dino_local_crops_loss"] = local_raw / n_terms
        out[f"{tag}_dino_global_crops_loss"] = global_raw * 2 / n_terms
    return out


def _replay_ibot(fx: dict) -> dict[str, torch.Tensor]:
    cfg, inp = fx["config"], fx["inputs"]
    temp, masks = cfg["teacher_temp"], inp["collated_masks"]
    n_masked = int(inp["n_masked_patches"][0])
    loss = iBOTPatchLoss(cfg["K"], student_temp=cfg["student_temp"], center_momentum=cfg["center_momentum"])
    loss.center.copy_(inp["center0"])
    teacher, student = inp["teacher_masked_logits"], inp["student_masked_logits"]
    out: dict[str, torch.Tensor] = {}
    out["softmax_center_teacher"] = loss.softmax_center_teacher(teacher.unsqueeze(0), temp).squeeze(0)
    loss.update_center(teacher.unsqueeze(0))
    loss.apply_center_update()
    out["center_after_apply"] = loss.center.clone()
    out["sinkhorn_knopp_teacher"] = loss.sinkhorn_knopp_teacher(teacher, temp, inp["n_masked_patches"].clone())
    for tag in ("softmax", "sinkhorn"):
        targets = out[f"{tag}_center_teacher" if tag == "softmax" else "sinkhorn_knopp_teacher"]
        weighted = loss.forward_masked(
            student, targets, student_masks_flat=masks, n_masked_patches=n_masked, masks_weight=inp["masks_weight"]
        )
        out[f"{tag}_forward_masked"] = weighted
        out[f"{tag}_forward_masked_no_weight_arg"] = loss.forward_masked(
            student, targets, masks, n_masked_patches=n_masked
        )
        out[f"{tag}_ibot_loss_metaarch"] = weighted * 2 * 0.5
    # A fresh loss has a zero center, so its centered softmax is the plain softmax of the dense fixture.
    dense_probs = IBOTPatchLoss(cfg["K"]).softmax_center_teacher(inp["teacher_dense_logits"], temp)
    out["dense_teacher_probs"] = dense_probs
    out["dense_forward"] = loss(inp["student_dense_logits"], fx["outputs"]["dense_teacher_probs"], masks)
    return out


def _replay_koleo(fx: dict) -> dict[str, torch.Tensor]:
    inp = fx["inputs"]
    koleo = KoLeoLoss()
    features = inp["features"]
    normalized = torch.nn.functional.normalize(features, p=2, dim=-1, eps=1e-8)
    nearest = koleo.pairwise_NNs_inner(normalized)
    weighted_sum = 0.1 * sum(koleo(chunk) for chunk in inp["global_cls_tokens"].chunk(2))
    return {
        "koleo": koleo(features),
        "nn_index": nearest,
        "nn_distance": torch.nn.PairwiseDistance(p=2, eps=1e-8)(normalized, normalized[nearest]),
        "koleo_with_duplicate_row": koleo(inp["features_with_duplicate"]),
        "koleo_metaarch_weighted_sum": weighted_sum,
        "koleo_metaarch_displayed": weighted_sum / 2,
    }


@pytest.mark.parametrize(
    ("fixture", "replay"),
    [("dino_loss.pt", _replay_dino), ("ibot_patch_loss.pt", _replay_ibot), ("koleo_loss.pt", _replay_koleo)],
)
def test_every_stored_output_matches_official(fixture: str, replay: object) -> None:
    assert not dist.is_initialized()
    fx = _load(fixture)
    _assert_all_outputs(replay(fx), fx["outputs"])


def test_dino_center_update_is_lazy_and_applied_once() -> None:
    fx = _load("dino_loss.pt")
    loss = DINOLoss(128)
    teacher = fx["inputs"]["teacher_logits_crop_order"]
    loss.update_center(teacher)
    assert torch.count_nonzero(loss.center) == 0
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, 0.1 * teacher.mean(dim=0, keepdim=True), atol=1e-7, rtol=0)
    after = loss.center.clone()
    loss.apply_center_update()
    assert torch.equal(loss.center, after)
    assert "center" in loss.state_dict()


def test_losses_leave_caller_tensors_untouched() -> None:
    fx = _load("ibot_patch_loss.pt")
    inp = fx["inputs"]
    teacher = inp["teacher_masked_logits"].clone()
    n_masked = inp["n_masked_patches"].clone()
    loss = iBOTPatchLoss(128)
    loss.sinkhorn_knopp_teacher(teacher, 0.07, n_masked)
    loss.update_center(teacher.unsqueeze(0))
    loss.softmax_center_teacher(teacher.unsqueeze(0), 0.07)
    assert torch.equal(teacher, inp["teacher_masked_logits"])
    assert torch.equal(n_masked, inp["n_masked_patches"])
    dino = DINOLoss(128)
    logits = fx["inputs"]["teacher_masked_logits"][:8].clone()
    dino.sinkhorn_knopp_teacher(logits, 0.07)
    dino.update_center(logits)
    dino.apply_center_update()
    assert torch.equal(logits, fx["inputs"]["teacher_masked_logits"][:8])


def test_sinkhorn_marginals_are_balanced() -> None:
    logits = 0.5 * torch.randn(12, 6)
    targets = sinkhorn_knopp(logits, 0.1, n_iterations=50)
    assert targets.shape == (12, 6)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(12), atol=1e-6, rtol=0)
    torch.testing.assert_close(targets.sum(dim=0), torch.full((6,), 2.0), atol=1e-4, rtol=0)


def test_ibot_dense_and_masked_forward_agree() -> None:
    masks = torch.rand(4, 10) < 0.4
    masks[1] = False
    student, teacher = torch.randn(4, 10, 16), torch.randn(4, 10, 16).softmax(-1)
    loss = IBOTPatchLoss(16)
    dense = loss(student, teacher, masks)
    masked = loss.forward_masked(student[masks], teacher[masks], masks)
    torch.testing.assert_close(dense, masked, atol=1e-6, rtol=0)
    padded = loss.forward_masked(
        torch.cat([student[masks], torch.randn(3, 16)]),
        torch.cat([teacher[masks], torch.rand(3, 16)]),
        masks,
        n_masked_patches=int(masks.sum()),
    )
    torch.testing.assert_close(padded, masked, atol=1e-6, rtol=0)


def test_koleo_rejects_single_row_and_handles_half_precision() -> None:
    koleo = KoLeoLoss()
    with pytest.raises(ValueError, match="B >= 2"):
        koleo(torch.randn(1, 8))
    features = torch.randn(6, 8)
    value = koleo(features.to(torch.bfloat16))
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, koleo(features.to(torch.bfloat16).float()), atol=0, rtol=0)


def test_gradients_reach_student_only() -> None:
    student = torch.randn(6, 16, requires_grad=True)
    teacher_logits = torch.randn(6, 16, requires_grad=True)
    dino = DINOLoss(16)
    targets = dino.softmax_center_teacher(teacher_logits, 0.07)
    assert not targets.requires_grad
    dino([student], [targets]).backward()
    assert student.grad is not None and torch.count_nonzero(student.grad) > 0
    assert teacher_logits.grad is None
    features = torch.randn(6, 16, requires_grad=True)
    KoLeoLoss()(features).backward()
    assert torch.isfinite(features.grad).all() and torch.count_nonzero(features.grad) > 0


def test_dino_forward_requires_inputs() -> None:
    with pytest.raises(ValueError, match="at least one"):
        DINOLoss(4)([], [torch.rand(2, 4)])
