"""Typed schema of a pretraining (and distillation) recipe. Defaults are the DINOv2 ViT-L/16 defaults
(facebookresearch/dinov2 ``ssl_default_config.yaml``) unless a comment says otherwise."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from core.config.fields import dataset_params, input_path, option
from core.errors import DinoscopeError

# ``crops.channel_mode`` names a photometric chain: one core builds itself (core.data.photometric) or one a domain
# registers in this entry-point group (geodino: multispectral, bio: fluorescence).
AUGMENTATIONS_GROUP = "dinoscope.augmentations"
CORE_CHANNEL_MODES = ("rgb",)


def channel_modes() -> tuple[str, ...]:
    """Every valid ``crops.channel_mode``: core's, then the registered ones. Only entry-point names are read, so
    validating a recipe imports no chain (and this schema module stays free of core.data)."""
    registered = sorted({ep.name for ep in entry_points(group=AUGMENTATIONS_GROUP)} - set(CORE_CHANNEL_MODES))
    return (*CORE_CHANNEL_MODES, *registered)


@dataclass
class ModelCfg:
    arch: str = "vit_large"  # a core.models.BACKBONES name, or "custom" with embed_dim/depth/num_heads
    patch_size: int = 16
    img_size: int = 224  # positional-table size; other input sizes are interpolated
    in_chans: int = 3
    embed_dim: int = 0  # only for arch "custom"
    depth: int = 0
    num_heads: int = 0
    drop_path_rate: float = 0.3
    drop_path_uniform: bool = True
    layerscale: float = 1e-5
    ffn_layer: str = "mlp"
    num_register_tokens: int = 0
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1
    channel_adaptive: bool = False
    attn_backend: str = "auto"
    pretrained: str = input_path()  # initialise the student (and teacher) from these weights (load_backbone)


@dataclass
class HeadCfg:
    n_prototypes: int = 65536
    bottleneck_dim: int = 256
    hidden_dim: int = 2048
    nlayers: int = 3


@dataclass
class DinoCfg:
    loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    head: HeadCfg = field(default_factory=HeadCfg)


@dataclass
class IbotCfg:
    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: list[float] = field(default_factory=lambda: [0.1, 0.5])
    separate_head: bool = False
    head: HeadCfg = field(default_factory=HeadCfg)


@dataclass
class TeacherCfg:
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: float = 30
    centering: str = "softmax"  # or "sinkhorn_knopp"


@dataclass
class OptimCfg:
    epochs: int = option(100, help="training epochs", minimum=1, cli=False)
    epoch_length: int = option(1250, help="iterations per epoch (DINOv2 OFFICIAL_EPOCH_LENGTH)", minimum=1, cli=False)
    weight_decay: float = option(0.04, help="AdamW weight decay at the start", minimum=0.0, cli=False)
    weight_decay_end: float = option(0.4, help="weight decay at the end (cosine)", minimum=0.0, cli=False)
    base_lr: float = option(0.004, help="learning rate before batch-size scaling", above=0.0, cli=False)
    scaling_rule: str = "sqrt_wrt_1024"  # or "none"
    warmup_epochs: float = option(10, help="linear lr warm-up", minimum=0.0, cli=False)
    min_lr: float = option(1.0e-6, help="final learning rate (cosine)", minimum=0.0, cli=False)
    clip_grad: float = option(3.0, help="per-module gradient-norm clip (0: off)", minimum=0.0, cli=False)
    freeze_last_layer_epochs: float = option(1, help="epochs with the last head layer frozen", minimum=0.0, cli=False)
    patch_embed_lr_mult: float = option(0.2, help="lr multiplier of the patch embedding", minimum=0.0, cli=False)
    layerwise_decay: float = option(0.9, help="lr decay per block from the top", above=0.0, maximum=1.0, cli=False)
    adamw_beta1: float = option(0.9, help="AdamW beta1", minimum=0.0, below=1.0, cli=False)
    adamw_beta2: float = option(0.999, help="AdamW beta2", minimum=0.0, below=1.0, cli=False)


@dataclass
class CropsCfg:
    global_crops_size: int = option(224, help="global crop side in pixels", minimum=1, cli=False)
    global_crops_scale: list[float] = option([0.32, 1.0], help="area fraction range", above=0.0, maximum=1.0, cli=False)
    local_crops_number: int = option(8, help="local crops per image", minimum=0, cli=False)
    local_crops_size: int = option(96, help="local crop side in pixels", minimum=1, cli=False)
    local_crops_scale: list[float] = option([0.05, 0.32], help="area fraction range", above=0.0, maximum=1.0, cli=False)
    channel_mode: str = "rgb"  # photometric chain: rgb, or a registered one (channel_modes())
    blur_probs: str = "released"  # released | paper
    mean: list[float] = field(default_factory=list)  # per channel; empty = ImageNet for RGB, else from the data
    std: list[float] = field(default_factory=list)


@dataclass
class DataCfg:
    kind: str = "image_folder"  # core.data.DATASET_KINDS, or a kind a domain package registers
    params: dict[str, Any] = dataset_params("kind")  # keyword arguments of the dataset factory


@dataclass
class TrainCfg:
    output_dir: str = "runs/pretrain"
    batch_size_per_rank: int = option(64, help="images per rank and step", minimum=1, cli=False)
    num_workers: int = option(4, help="DataLoader worker processes", minimum=0, cli=False)
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16
    max_iters: int = option(0, help="stop after this many iterations (0: epochs x epoch_length)", minimum=0, cli=False)
    checkpoint_every: int = option(1250, help="iterations between checkpoints", minimum=1, cli=False)
    keep_checkpoints: int = option(3, help="checkpoints kept (older ones are removed)", minimum=1, cli=False)
    log_every: int = option(10, help="iterations between metric lines", minimum=1, cli=False)
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA exists, else cpu; or cpu | cuda | cuda:N
    pin_memory: bool | None = None  # None: pinned host batches exactly when training on CUDA
    persistent_workers: bool = True  # keep DataLoader workers alive between epochs (only with num_workers > 0)
    prefetch_factor: int = option(2, help="batches each worker prepares ahead (num_workers > 0)", minimum=1, cli=False)
    tensorboard: bool = option(False, help="also write TensorBoard scalars to RUN/tensorboard", cli=False)
    log_grad_norms: bool = True  # log per-module gradient norms on logging steps (clipping computes them anyway)


@dataclass
class DistCfg:
    """How the run is distributed. The DeepSpeed keys mirror its ``zero_optimization`` section (sizes in elements);
    ``deepspeed_overrides`` is deep-merged last and checked by DeepSpeed's own config parser."""

    strategy: str = "single"  # single | deepspeed
    zero_stage: int = 2
    offload: bool = False
    grad_accum: int = 1  # micro-batches of train.batch_size_per_rank per optimizer step
    overlap_comm: bool | None = None  # None: DeepSpeed's choice per stage (on for ZeRO-3)
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000  # ZeRO-1/2
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    ema_gather_numel: int = 50_000_000  # ZeRO-3: student elements gathered at once for the EMA teacher update
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalCfg:
    every: int = 0  # iterations between kNN evaluations; 0 = off
    train: DataCfg | None = None  # labelled sets for the periodic kNN
    val: DataCfg | None = None
    ks: list[int] = field(default_factory=lambda: [10, 20])


@dataclass
class DistillCfg:
    teacher_weights: str = input_path()  # a frozen pretrained teacher (load_backbone) instead of the EMA teacher
    teacher_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class PretrainRecipe:
    model: ModelCfg = field(default_factory=ModelCfg)
    dino: DinoCfg = field(default_factory=DinoCfg)
    ibot: IbotCfg = field(default_factory=IbotCfg)
    teacher: TeacherCfg = field(default_factory=TeacherCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    crops: CropsCfg = field(default_factory=CropsCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    dist: DistCfg = field(default_factory=DistCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    distill: DistillCfg = field(default_factory=DistillCfg)

    def validate(self, path: str | os.PathLike | None = None) -> None:
        """Impossible values fail here, before anything runs."""
        choices = {
            "teacher.centering": (self.teacher.centering, ("softmax", "sinkhorn_knopp")),
            "train.precision": (self.train.precision, ("fp32", "bf16", "fp16")),
            "dist.strategy": (self.dist.strategy, ("single", "deepspeed")),
            "crops.channel_mode": (self.crops.channel_mode, channel_modes()),
            "crops.blur_probs": (self.crops.blur_probs, ("released", "paper")),
            "optim.scaling_rule": (self.optim.scaling_rule, ("sqrt_wrt_1024", "none")),
            "model.ffn_layer": (self.model.ffn_layer, ("mlp", "swiglu", "swiglufused")),
        }
        for key, (value, valid) in choices.items():
            if value not in valid:
                raise DinoscopeError(f"{key} is {value!r}", path=path, field=key, fix=f"use one of {valid}")
        if self.dist.zero_stage not in (1, 2, 3):
            raise DinoscopeError(
                f"dist.zero_stage is {self.dist.zero_stage}", path=path, field="dist.zero_stage", fix="use 1, 2 or 3"
            )
        p = self.model.patch_size
        for key, size in (
            ("crops.global_crops_size", self.crops.global_crops_size),
            ("crops.local_crops_size", self.crops.local_crops_size),
        ):
            if size % p:
                raise DinoscopeError(
                    f"{key} {size} is not a multiple of model.patch_size {p}",
                    path=path,
                    field=key,
                    fix=f"use a multiple of {p}, e.g. {size - size % p or p}",
                )
        total = self.total_iters()
        o = self.optim
        for key, epochs in (
            ("optim.warmup_epochs", o.warmup_epochs),
            ("teacher.warmup_teacher_temp_epochs", self.teacher.warmup_teacher_temp_epochs),
            ("optim.freeze_last_layer_epochs", o.freeze_last_layer_epochs),
        ):
            if round(epochs * o.epoch_length) > total:
                raise DinoscopeError(
                    f"{key} = {epochs} epochs is {round(epochs * o.epoch_length)} iterations, more "
                    f"than the {total} the run has",
                    path=path,
                    field=key,
                    fix=f"shorten it to at most {total / o.epoch_length:g} epochs or train longer",
                )
        lo, hi = self.ibot.mask_ratio_min_max
        if not 0 <= lo <= hi <= 1:
            raise DinoscopeError(
                "ibot.mask_ratio_min_max must satisfy 0 <= min <= max <= 1", path=path, field="ibot.mask_ratio_min_max"
            )
        self._validate_distribution(path)

    def _validate_distribution(self, path: str | os.PathLike | None) -> None:
        d, t = self.dist, self.train
        for key, value in (
            ("dist.grad_accum", d.grad_accum),
            ("dist.reduce_bucket_size", d.reduce_bucket_size),
            ("dist.allgather_bucket_size", d.allgather_bucket_size),
            ("dist.stage3_prefetch_bucket_size", d.stage3_prefetch_bucket_size),
            ("dist.stage3_max_live_parameters", d.stage3_max_live_parameters),
            ("dist.ema_gather_numel", d.ema_gather_numel),
            ("train.prefetch_factor", t.prefetch_factor),
            ("train.log_every", t.log_every),
            ("train.checkpoint_every", t.checkpoint_every),
        ):
            if value < 1:
                raise DinoscopeError(f"{key} must be at least 1, got {value}", path=path, field=key)
        for key, value in (
            ("dist.stage3_param_persistence_threshold", d.stage3_param_persistence_threshold),
            ("dist.stage3_max_reuse_distance", d.stage3_max_reuse_distance),
        ):
            if value < 0:
                raise DinoscopeError(f"{key} must be >= 0, got {value}", path=path, field=key)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):
            raise DinoscopeError(
                f"train.device is {t.device!r}", path=path, field="train.device", fix="use auto, cpu, cuda or cuda:N"
            )
        if self.dino.koleo_loss_weight and t.batch_size_per_rank < 2:
            # KoLeo (Sablayrolles et al. 2019) is a nearest-neighbour entropy estimate over the images of one rank,
            # as in DINOv2; with a single image per rank it has no neighbour and would be a constant.
            raise DinoscopeError(
                f"the KoLeo regulariser needs at least 2 images per rank, but "
                f"train.batch_size_per_rank is {t.batch_size_per_rank}",
                path=path,
                field="dino.koleo_loss_weight",
                fix="raise train.batch_size_per_rank to 2 or more (use dist.grad_accum to keep "
                "memory down), or set dino.koleo_loss_weight=0",
            )

    def total_iters(self) -> int:
        return self.train.max_iters or self.optim.epochs * self.optim.epoch_length
