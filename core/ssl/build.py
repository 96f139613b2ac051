"""Builders: recipe sub-configs -> backbones, heads, the meta-architecture, the augmentation and the data loader."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from core.config.loader import check_kwargs
from core.config.pretrain import CropsCfg, DataCfg, ModelCfg, PretrainRecipe
from core.data.datasets import build_dataset, dataset_kinds
from core.data.multicrop import MultiCropAugmentation
from core.errors import DinoscopeError
from core.models import DINOHead, VisionTransformer, build_backbone
from core.models.factories import BACKBONES
from core.ssl.meta_arch import SSLMetaArch
from core.weights import load_backbone, read_checkpoint, strict_load

log = logging.getLogger(__name__)


def backbone_kwargs(cfg: ModelCfg) -> dict[str, Any]:
    """VisionTransformer keywords for a model sub-config (without drop path)."""
    kwargs: dict[str, Any] = dict(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        init_values=cfg.layerscale,
        ffn_layer=cfg.ffn_layer,
        num_register_tokens=cfg.num_register_tokens,
        block_chunks=0,
        interpolate_antialias=cfg.interpolate_antialias,
        interpolate_offset=cfg.interpolate_offset,
        channel_adaptive=cfg.channel_adaptive,
        attn_backend=cfg.attn_backend,
    )
    if cfg.arch == "custom":
        if not (cfg.embed_dim and cfg.depth and cfg.num_heads):
            raise DinoscopeError(
                "model.arch 'custom' needs model.embed_dim, model.depth and model.num_heads", field="model.embed_dim"
            )
        kwargs.update(embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)
    return kwargs


def build_student_teacher(cfg: ModelCfg) -> tuple[VisionTransformer, VisionTransformer]:
    """Student and teacher backbones: the student with drop path (and ``model.pretrained`` loaded strictly when set),
    the teacher without drop path, starting from the student's weights.
    """
    kwargs = backbone_kwargs(cfg)

    def make(**extra: Any) -> VisionTransformer:
        if cfg.arch == "custom":
            return VisionTransformer(**kwargs, **extra)
        return build_backbone(cfg.arch, **kwargs, **extra)

    student = make(drop_path_rate=cfg.drop_path_rate, drop_path_uniform=cfg.drop_path_uniform)
    if cfg.pretrained:
        pretrained, _ = load_backbone(cfg.pretrained, in_chans=cfg.in_chans)
        strict_load(student, pretrained.state_dict(), cfg.pretrained)
    teacher = make()
    teacher.load_state_dict(student.state_dict())
    return student, teacher


def _head(in_dim: int, cfg: Any) -> DINOHead:
    return DINOHead(
        in_dim, cfg.n_prototypes, hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.bottleneck_dim, nlayers=cfg.nlayers
    )


def build_meta_arch(recipe: PretrainRecipe) -> SSLMetaArch:
    """EMA pretraining, or distillation from a frozen pretrained teacher when ``distill.teacher_weights`` is set."""
    student, teacher = build_student_teacher(recipe.model)
    dino, ibot = recipe.dino, recipe.ibot
    s_dino = _head(student.embed_dim, dino.head)
    s_ibot = _head(student.embed_dim, ibot.head) if ibot.separate_head else None
    if recipe.distill.teacher_weights:
        teacher, t_dino, t_ibot = _distillation_teacher(recipe, s_dino, s_ibot)
    else:
        t_dino, t_ibot = copy.deepcopy(s_dino), copy.deepcopy(s_ibot)
    return SSLMetaArch(
        student_backbone=student,
        teacher_backbone=teacher,
        student_dino_head=s_dino,
        teacher_dino_head=t_dino,
        student_ibot_head=s_ibot,
        teacher_ibot_head=t_ibot,
        n_local_crops=recipe.crops.local_crops_number,
        dino_loss_weight=dino.loss_weight,
        koleo_loss_weight=dino.koleo_loss_weight,
        ibot_loss_weight=ibot.loss_weight,
        centering=recipe.teacher.centering,
        dino_out_dim=dino.head.n_prototypes,
        ibot_out_dim=ibot.head.n_prototypes if ibot.separate_head else None,
    )


def _distillation_teacher(
    recipe: PretrainRecipe, s_dino: nn.Module, s_ibot: nn.Module | None
) -> tuple[nn.Module, nn.Module, nn.Module | None]:
    """A frozen pretrained backbone; its heads come from the checkpoint when it has them (``teacher.dino_head``),
    otherwise they are frozen random projections (seeded), which still transfer the teacher's feature geometry."""
    path = recipe.distill.teacher_weights
    teacher, meta = load_backbone(path, **recipe.distill.teacher_overrides)
    sd, _, _ = read_checkpoint(path)
    sd = {k[len("teacher.") :] if k.startswith("teacher.") else k: v for k, v in sd.items()}
    g = torch.Generator().manual_seed(recipe.train.seed + 1)
    heads = []
    for name, cfg in (("dino_head", recipe.dino.head), ("ibot_head", recipe.ibot.head)):
        if name == "ibot_head" and s_ibot is None:
            heads.append(None)
            continue
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
            head = _head(meta.embed_dim, cfg)
        own = {k[len(name) + 1 :]: v for k, v in sd.items() if k.startswith(name + ".")}
        if own:
            strict_load(head, own, path)
            log.info("distillation teacher %s loaded from %s", name, path)
        heads.append(head)
    return teacher, heads[0], heads[1]


def build_augmentation(crops: CropsCfg, model: ModelCfg) -> MultiCropAugmentation:
    """DINOv2 multi-crop augmentation of the recipe: 2 global and ``local_crops_number`` local crops of
    ``model.in_chans`` channels.
    """
    return MultiCropAugmentation(
        global_crops_size=crops.global_crops_size,
        global_crops_scale=tuple(crops.global_crops_scale),
        local_crops_number=crops.local_crops_number,
        local_crops_size=crops.local_crops_size,
        local_crops_scale=tuple(crops.local_crops_scale),
        channel_mode=crops.channel_mode,
        blur_probs=crops.blur_probs,
        in_chans=model.in_chans,
        mean=list(crops.mean) or None,
        std=list(crops.std) or None,
    )


def preflight(recipe: PretrainRecipe, path: Any = None) -> None:
    """Every check that needs no data and no weights: the backbone name and shape, the dataset kind and its
    parameters. Training runs this before it writes anything into the run directory."""
    kwargs = backbone_kwargs(recipe.model)
    if recipe.model.arch != "custom" and recipe.model.arch not in BACKBONES:
        raise DinoscopeError(
            f"unknown backbone {recipe.model.arch!r}",
            path=path,
            field="model.arch",
            fix=f"use one of {sorted(BACKBONES)}, or 'custom' with embed_dim, depth and num_heads",
        )
    if recipe.model.arch == "custom" and kwargs["embed_dim"] % kwargs["num_heads"]:
        raise DinoscopeError(
            f"model.embed_dim {kwargs['embed_dim']} is not divisible by model.num_heads {kwargs['num_heads']}",
            path=path,
            field="model.num_heads",
        )
    _dataset_factory(recipe.data, path)


def _dataset_factory(cfg: DataCfg, path: Any) -> Any:
    kinds = dataset_kinds()
    if cfg.kind not in kinds:
        raise DinoscopeError(
            f"unknown data.kind {cfg.kind!r}", path=path, field="data.kind", fix=f"use one of {sorted(kinds)}"
        )
    factory = kinds[cfg.kind]
    factory = factory.load() if hasattr(factory, "load") else factory
    check_kwargs(factory, dict(cfg.params), "data.params", path)
    return factory


def build_data(cfg: DataCfg, path: Any = None) -> Any:
    """The pretraining dataset of kind ``data.kind`` (core or ``dinoscope.datasets`` entry point) with ``data.params``.

    Raises :class:`~core.errors.DinoscopeError` naming ``path`` for an unknown kind or parameter.
    """
    _dataset_factory(cfg, path)
    return build_dataset(cfg.kind, **cfg.params)
