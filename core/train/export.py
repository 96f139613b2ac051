"""Export a training run's teacher backbone in the portable format (safetensors + JSON sidecar)."""

from __future__ import annotations

from pathlib import Path

import yaml

from core.config.loader import load_recipe
from core.config.pretrain import PretrainRecipe
from core.distributed.device import place
from core.errors import DinoscopeError
from core.models.factories import ARCH_SIZES
from core.ssl.build import backbone_kwargs, build_augmentation
from core.train.checkpoint import consolidated_teacher_state_dict, find_latest
from core.weights.export import save_backbone
from core.weights.load import _META_KEYS
from core.weights.meta import WeightMeta, default_channel_names


def export_run(run_dir: Path, out: Path, step: int | None = None) -> Path:
    """Export the teacher backbone of a run's latest checkpoint (or of ``step``) to ``out`` (.safetensors + sidecar).

    The sidecar records the architecture, channel names and the input normalisation the recipe trained with.
    Returns the weights path; a directory without ``config.yaml`` or checkpoints raises ``DinoscopeError``.
    """
    config = run_dir / "config.yaml"
    if not config.exists():
        raise DinoscopeError(
            "not a run directory (no config.yaml)", path=run_dir, fix="pass the directory `dinoscope pretrain` wrote"
        )
    recipe = load_recipe(PretrainRecipe, config)
    ckpt = find_latest(run_dir) if step is None else run_dir / "checkpoints" / f"step_{step:08d}"
    if ckpt is None or not Path(ckpt).exists():
        raise DinoscopeError(
            "the run has no checkpoint to export",
            path=run_dir / "checkpoints",
            fix="train for at least train.checkpoint_every iterations first",
        )
    teacher = consolidated_teacher_state_dict(Path(ckpt))
    # the one placement function, so exported tensors are host tensors whatever device wrote the checkpoint
    backbone = place({k[len("backbone.") :]: v for k, v in teacher.items() if k.startswith("backbone.")}, "cpu")
    kwargs = backbone_kwargs(recipe.model)
    if recipe.model.arch != "custom":
        dim, depth, heads = ARCH_SIZES[recipe.model.arch]
        kwargs.update(embed_dim=dim, depth=depth, num_heads=heads)
    kwargs["mlp_ratio"] = 4.0
    c = recipe.model.in_chans
    # The augmentation chain of the recipe's channel mode knows how crops were normalised in training (a domain
    # chain may standardise each crop itself, e.g. bio's fluorescence chain), so export asks it, not the mode name.
    stats = build_augmentation(recipe.crops, recipe.model).normalisation(c)
    per_image = stats is None
    mean, std = ([0.0] * c, [1.0] * c) if per_image else stats
    names = _channel_names(recipe, c)
    meta = WeightMeta(
        arch=recipe.model.arch,
        model_kwargs={k: v for k, v in kwargs.items() if k in _META_KEYS},
        channel_names=names,
        mean=mean,
        std=std,
        source_format="dinoscope",
        extra={
            "recipe": yaml.safe_load(config.read_text()),
            "checkpoint": str(ckpt),
            "input_normalisation": "per_image_zscore" if per_image else "fixed",
        },
    )
    return save_backbone(backbone, meta, out)


def _channel_names(recipe: object, c: int) -> list[str]:
    names = getattr(recipe.data, "params", {}).get("channel_names") if hasattr(recipe, "data") else None
    return list(names) if names and len(names) == c else default_channel_names(c)
