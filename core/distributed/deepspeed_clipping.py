"""Per-sub-module gradient clipping of the DeepSpeed strategy, on each rank's own ZeRO gradient fragments.

DINOv2 clips the backbone, the DINO head and the iBOT head separately (Oquab et al. 2023, facebookresearch/dinov2
``train/train.py``), while DeepSpeed's ``gradient_clipping`` is one global norm, so that is kept at 0 and the strategy
clips per sub-module itself: every rank sums the squares of the gradient fragments it owns (ZeRO-1/2: its slice of
the flat partition, through the tensor-fragment mapping DeepSpeed keeps for each parameter; ZeRO-3:
``safe_get_local_grad``), one all-reduce of a vector with one entry per sub-module gives the norms, and each rank
scales its own fragments by ``min(1, clip / (norm + 1e-6))`` before the optimizer step (the same coefficient as
``torch.nn.utils.clip_grad_norm_``). No parameter is ever gathered for this.
"""

from __future__ import annotations

import torch
from torch import nn

from core.distributed.clipping import clip_coefficients, submodule_parameters
from core.distributed.deepspeed_backend import get_accelerator, safe_get_local_grad, safe_set_local_grad
from core.distributed.env import get_world_size

GradFragments = dict[str, list[tuple[nn.Parameter, torch.Tensor]]]


def local_grad_fragments(student: nn.Module, zero_stage: int) -> GradFragments:
    """This rank's slice of every student gradient, per sub-module (valid between backward and step)."""
    fragments: GradFragments = {}
    for name, params in submodule_parameters(student).items():
        owned = []
        for param in params:
            if zero_stage == 3:
                grad = safe_get_local_grad(param)
            else:
                mapping = getattr(param, "_hp_mapping", None)
                if mapping is None:  # no element of this parameter lies in this rank's partition
                    continue
                grad = mapping.get_lp_grad_fragment(param._index_in_param_group)
                address = mapping.lp_fragment_address
                if grad.numel() == param.numel() and address.numel != param.numel():
                    # a rank that keeps a full accumulation buffer owns only its address range of it
                    grad = grad.reshape(-1).narrow(0, address.start, address.numel)
            if grad is not None:
                owned.append((param, grad))
        fragments[name] = owned
    return fragments


def global_norms(fragments: GradFragments, loss_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """L2 norm of each sub-module's full gradient: local norms, one all-reduce of their squares, fp16 unscaled.

    The local norm uses the same ``get_total_norm`` as the single-process strategy, so at world size 1 (where
    a rank's fragments are the whole gradients) both strategies clip with bit-identical coefficients.
    ``loss_scale`` is the fp16 loss scale the gradients carry (1 otherwise).
    """
    device = get_accelerator().current_device_name()
    local = torch.zeros(len(fragments), dtype=torch.float32, device=device)
    for index, owned in enumerate(fragments.values()):
        if owned:
            local[index] = torch.nn.utils.get_total_norm([g for _, g in owned], foreach=True).to(device)
    if get_world_size() > 1:
        squares = local.pow(2)
        torch.distributed.all_reduce(squares)
        local = squares.sqrt()
    totals = local / loss_scale if loss_scale != 1.0 else local
    return {name: totals[index] for index, name in enumerate(fragments)}


def scale_fragments(
    fragments: GradFragments, norms: dict[str, torch.Tensor], grad_clip: float, zero_stage: int
) -> None:
    """Scale each rank's own fragments by the clip coefficient of their sub-module (in place)."""
    for name, owned in fragments.items():
        coefficient = clip_coefficients(norms[name], grad_clip)
        if not torch.isfinite(norms[name]):
            continue  # an overflowing fp16 step is skipped by DeepSpeed's loss scaler anyway
        for param, grad in owned:
            if zero_stage == 3:
                safe_set_local_grad(param, grad * coefficient.to(grad.device, grad.dtype))
            else:
                grad.mul_(coefficient.to(grad.device, grad.dtype))
