"""DINOv2 meta-architecture: student and teacher (backbone + heads), with separate teacher, student and loss steps.

Loss composition follows Oquab et al. (arXiv:2304.07193, Sec. 3) and facebookresearch/dinov2
``train/ssl_meta_arch.py``: DINO cross-entropy between every student crop and every *other* teacher global crop
(teacher global outputs swapped), normalised by ``Z = 2 + max(2 * n_local, 1)``; iBOT on the masked patches of the
global crops; KoLeo on each global crop's student class tokens. Backward, clipping, stepping and the EMA are the
training strategy's job (``core.distributed``), not this module's.

Batch shapes (``B`` images, ``n_l`` local crops, ``N`` patches per global crop, ``M`` masked patches):
    global crops ``[2B, C, S, S]`` crop-major, local crops ``[n_l*B, C, s, s]``, masks ``[2B, N]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from core.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss


def loss_normaliser(n_local_crops: int) -> int:
    """DINO loss normaliser ``Z = n_global_terms + n_local_terms`` of DINOv2's ``SSLMetaArch.forward_backward``.

    ``n_global_terms = (2 - 1) * 2`` (each global crop against the other one) and ``n_local_terms =
    max(2 * n_local, 1)``: the ``max`` keeps the official value 3, not 2, when a recipe has no local crops.
    """
    return 2 + max(2 * n_local_crops, 1)


class SSLMetaArch(nn.Module):
    """Student/teacher pair with DINO + iBOT + KoLeo losses.

    Args:
        student_backbone, teacher_backbone: ViTs (the teacher is usually a copy of the student without drop path;
            for distillation a bigger frozen pretrained network).
        student_dino_head, teacher_dino_head: DINO heads; the iBOT loss shares them unless iBOT heads are given.
        student_ibot_head, teacher_ibot_head: separate iBOT heads (``ibot.separate_head``).
        centering: ``softmax`` (EMA centre) or ``sinkhorn_knopp``.
    """

    def __init__(
        self,
        *,
        student_backbone: nn.Module,
        teacher_backbone: nn.Module,
        student_dino_head: nn.Module,
        teacher_dino_head: nn.Module,
        student_ibot_head: nn.Module | None = None,
        teacher_ibot_head: nn.Module | None = None,
        n_local_crops: int = 8,
        dino_loss_weight: float = 1.0,
        koleo_loss_weight: float = 0.1,
        ibot_loss_weight: float = 1.0,
        centering: str = "softmax",
        dino_out_dim: int,
        ibot_out_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.student = nn.ModuleDict({"backbone": student_backbone, "dino_head": student_dino_head})
        self.teacher = nn.ModuleDict({"backbone": teacher_backbone, "dino_head": teacher_dino_head})
        self.separate_ibot_head = student_ibot_head is not None
        if self.separate_ibot_head:
            self.student["ibot_head"] = student_ibot_head
            self.teacher["ibot_head"] = teacher_ibot_head
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.n_local_crops = n_local_crops
        self.dino_loss_weight = dino_loss_weight
        self.koleo_loss_weight = koleo_loss_weight
        self.ibot_loss_weight = ibot_loss_weight
        self.centering = centering
        self.dino_loss = DINOLoss(dino_out_dim)
        self.ibot_loss = iBOTPatchLoss(ibot_out_dim or dino_out_dim)
        self.koleo_loss = KoLeoLoss()

    # ------------------------------------------------------------------------------------------------ teacher
    @torch.no_grad()
    def teacher_output(self, batch: dict[str, Any], teacher_temp: float) -> dict[str, Tensor]:
        """Teacher targets: DINO ``[2, B, K]`` (crops swapped) and iBOT ``[M, K]`` on the masked patches."""
        self.teacher.eval()
        crops = batch["collated_global_crops"]
        out = self.teacher["backbone"](crops, is_training=True)
        cls = out["x_norm_clstoken"]
        cls = torch.cat(cls.chunk(2)[::-1])  # row r pairs with the *other* global crop of the same image
        patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, batch["mask_indices_list"])
        dino_logits, ibot_logits = self._heads(self.teacher, cls, patches)
        n_masked = batch["n_masked_patches"]
        if self.centering == "sinkhorn_knopp":
            dino_t = self.dino_loss.sinkhorn_knopp_teacher(dino_logits, teacher_temp)
            ibot_t = self.ibot_loss.sinkhorn_knopp_teacher(ibot_logits, teacher_temp, n_masked)
        else:
            dino_t = self.dino_loss.softmax_center_teacher(dino_logits, teacher_temp)
            self.dino_loss.update_center(dino_logits)
            ibot_t = self.ibot_loss.softmax_center_teacher(ibot_logits.unsqueeze(0), teacher_temp).squeeze(0)
            self.ibot_loss.update_center(ibot_logits.unsqueeze(0))
        return {"dino": dino_t.view(2, -1, dino_t.shape[-1]), "ibot": ibot_t}

    # ------------------------------------------------------------------------------------------------ student
    def student_output(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Student logits for the (masked) global crops, the local crops and the masked patches."""
        backbone = self.student["backbone"]
        if self.n_local_crops:
            # One backbone call over both crop sets, as DINOv2's forward over a list of crops: every block runs
            # once per step, so ZeRO-3 gathers each block's parameters once forward and once backward.
            g, local = backbone(
                [batch["collated_global_crops"], batch["collated_local_crops"]],
                masks=[batch["collated_masks"], None],
                is_training=True,
            )
        else:
            g, local = backbone(batch["collated_global_crops"], masks=batch["collated_masks"], is_training=True), None
        out = {"global_cls": g["x_norm_clstoken"]}
        patches = g["x_norm_patchtokens"].flatten(0, 1).index_select(0, batch["mask_indices_list"])
        cls = g["x_norm_clstoken"]
        if local is not None:
            cls = torch.cat([local["x_norm_clstoken"], cls])
        dino_logits, ibot_logits = self._heads(self.student, cls, patches)
        n_local_rows = cls.shape[0] - out["global_cls"].shape[0]
        out["local_logits"] = dino_logits[:n_local_rows]
        out["global_logits"] = dino_logits[n_local_rows:]
        out["ibot_logits"] = ibot_logits
        return out

    def _heads(self, net: nn.ModuleDict, cls: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
        if self.separate_ibot_head:
            return net["dino_head"](cls), net["ibot_head"](patches)
        # One head call on [cls; patches]: an MLP has no cross-row interaction, so this only batches the work.
        logits = net["dino_head"](torch.cat([cls, patches]))
        return logits[: cls.shape[0]], logits[cls.shape[0] :]

    # ------------------------------------------------------------------------------------------------ losses
    def compute_losses(
        self, student: dict[str, Tensor], teacher: dict[str, Tensor], batch: dict[str, Any]
    ) -> dict[str, Tensor]:
        """Weighted loss terms and their sum under ``total`` (the value to back-propagate)."""
        z = loss_normaliser(self.n_local_crops)
        losses: dict[str, Tensor] = {}
        targets = teacher["dino"]  # 2 x B x K
        if self.n_local_crops:
            local = self.dino_loss(list(student["local_logits"].chunk(self.n_local_crops)), list(targets))
            losses["dino_local"] = self.dino_loss_weight * local / z
        glob = self.dino_loss([student["global_logits"]], [targets.flatten(0, 1)])
        losses["dino_global"] = self.dino_loss_weight * glob * 2 / z
        if self.koleo_loss_weight:
            losses["koleo"] = self.koleo_loss_weight * sum(self.koleo_loss(c) for c in student["global_cls"].chunk(2))
        if self.ibot_loss_weight and student["ibot_logits"].shape[0]:
            ibot = self.ibot_loss.forward_masked(
                student["ibot_logits"],
                teacher["ibot"],
                student_masks_flat=batch["collated_masks"],
                n_masked_patches=int(batch["n_masked_patches"].sum()),
                masks_weight=batch["masks_weight"],
            )
            losses["ibot"] = self.ibot_loss_weight * ibot
        losses["total"] = sum(losses.values())
        return losses

    def forward(self, batch: dict[str, Any], teacher_temp: float) -> dict[str, Tensor]:
        """Loss terms of one batch (``dino_local``, ``dino_global``, ``koleo``, ``ibot`` when enabled) and ``total``:
        teacher targets at ``teacher_temp``, student outputs, then :meth:`compute_losses`.
        """
        teacher = self.teacher_output(batch, teacher_temp)
        student = self.student_output(batch)
        return self.compute_losses(student, teacher, batch)

    def loss_state(self) -> dict[str, Tensor]:
        """Centre buffers that a resumed run must restore (pending lazy updates applied first)."""
        self.dino_loss.apply_center_update()
        self.ibot_loss.apply_center_update()
        return {"dino_center": self.dino_loss.center.clone(), "ibot_center": self.ibot_loss.center.clone()}

    def load_loss_state(self, state: dict[str, Tensor]) -> None:
        """Restore the centre buffers saved by :meth:`loss_state` (pending centre updates are dropped)."""
        self.dino_loss.apply_center_update()
        self.ibot_loss.apply_center_update()
        self.dino_loss.center.copy_(state["dino_center"])
        self.ibot_loss.center.copy_(state["ibot_center"])
