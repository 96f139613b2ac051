"""The pretraining loop: flat and readable (nanoGPT style), iteration-based and resumable.

    for it in range(start, total):
        schedules[it] -> optimizer groups
        teacher targets, student logits, losses          (core.ssl.SSLMetaArch)
        backward, clip per sub-module, step, EMA          (core.dist strategy)
        reduce + NaN guard, log JSONL, progress, eval, checkpoint
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from core.config.pretrain import PretrainRecipe
from core.errors import DinoscopeError
from core.logging import JsonlLogger, progress
from core.train.param_groups import apply_optim_schedule, fuse_params_groups, get_params_groups_with_decay
from core.train.schedules import build_schedules, scaled_lr

log = logging.getLogger(__name__)


def _param_groups(meta_arch: Any, recipe: PretrainRecipe) -> list[dict]:
    groups: list[dict] = []
    for name, module in meta_arch.student.items():
        decay = recipe.optim.layerwise_decay if name == "backbone" else 1.0
        mult = recipe.optim.patch_embed_lr_mult if name == "backbone" else 1.0
        groups += get_params_groups_with_decay(module, lr_decay_rate=decay, patch_embed_lr_mult=mult)
    return fuse_params_groups(groups)


def _schedules(recipe: PretrainRecipe, world_size: int) -> tuple[Any, float]:
    """Per-iteration schedules; recipe durations in epochs are converted to whole iterations here."""
    o, t = recipe.optim, recipe.teacher
    lr = scaled_lr(o.base_lr, recipe.train.batch_size_per_rank, world_size, rule=o.scaling_rule)

    def iters(epochs: float) -> int:
        return int(round(epochs * o.epoch_length))

    return build_schedules(base_lr=lr, min_lr=o.min_lr, epochs=recipe.total_iters(),
                           warmup_epochs=iters(o.warmup_epochs), epoch_length=1, weight_decay=o.weight_decay,
                           weight_decay_end=o.weight_decay_end, momentum_teacher=t.momentum_teacher,
                           final_momentum_teacher=t.final_momentum_teacher, warmup_teacher_temp=t.warmup_teacher_temp,
                           teacher_temp=t.teacher_temp, warmup_teacher_temp_epochs=iters(t.warmup_teacher_temp_epochs),
                           freeze_last_layer_epochs=iters(o.freeze_last_layer_epochs)), lr


def _memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(recipe: PretrainRecipe, run_dir: str | os.PathLike, *, resume: bool = True,
          stop_after: int | None = None) -> dict[str, Any]:
    """Pretrain (or distil) as the recipe says; returns the last logged metrics.

    ``stop_after`` ends the run early after that many iterations of this call (tests use it to simulate a crash).
    """
    from core.dist.env import all_reduce_mean, init_distributed
    from core.dist.strategy import build_strategy
    from core.ssl.build import build_augmentation, build_data, build_meta_arch
    from core.train.checkpoint import find_latest, load_training_state, save_training_state
    from core.train.data import ChannelsAsSamples, build_ssl_loader
    from core.train.report import write_loss_curve

    run_dir = Path(run_dir)
    env = init_distributed()
    torch.manual_seed(recipe.train.seed + env.rank)
    dataset = build_data(recipe.data)
    if recipe.model.channel_adaptive:
        dataset = ChannelsAsSamples(dataset)
    meta_arch = build_meta_arch(recipe)
    schedules, lr = _schedules(recipe, env.world_size)
    total = recipe.total_iters()
    if recipe.dist.strategy == "deepspeed":
        strategy = build_strategy("deepspeed", zero_stage=recipe.dist.zero_stage, offload=recipe.dist.offload,
                                  micro_batch_size=recipe.train.batch_size_per_rank)
    else:
        strategy = build_strategy("single")
    strategy.setup(meta_arch.student, meta_arch.teacher, _param_groups(meta_arch, recipe),
                   grad_clip=recipe.optim.clip_grad or None, precision=recipe.train.precision,
                   betas=(recipe.optim.adamw_beta1, recipe.optim.adamw_beta2))
    start = 0
    latest = find_latest(run_dir) if resume else None
    if latest is not None:
        state = load_training_state(latest, strategy)
        start = int(state["iteration"])
        meta_arch.load_loss_state(state["loss_state"])
        log.info("resumed from %s at iteration %d", latest, start)
    loader = build_ssl_loader(dataset, build_augmentation(recipe.crops, recipe.model),
                              batch_size=recipe.train.batch_size_per_rank,
                              global_crops_size=recipe.crops.global_crops_size, patch_size=recipe.model.patch_size,
                              mask_ratio=tuple(recipe.ibot.mask_ratio_min_max),
                              mask_probability=recipe.ibot.mask_sample_probability, seed=recipe.train.seed,
                              rank=env.rank, world_size=env.world_size, start_iteration=start,
                              num_workers=recipe.train.num_workers)
    metrics_log = JsonlLogger(run_dir / "metrics.jsonl")
    evaluator = _periodic_knn(recipe, run_dir)
    distill = bool(recipe.distill.teacher_weights)
    log.info("training %d iterations from %d; world size %d; scaled lr %.3g; strategy %s", total, start,
             env.world_size, lr, recipe.dist.strategy)
    batches = iter(loader)
    last: dict[str, Any] = {}
    end = total if stop_after is None else min(total, start + stop_after)
    t_last = time.perf_counter()
    bar = progress(range(start, end), total=total, initial=start, desc="pretrain", unit="it")
    for it in bar:
        batch = next(batches)
        s = schedules.at(it)
        apply_optim_schedule(strategy.optimizer, s["lr"], s["wd"], s["last_layer_lr"])
        with strategy.autocast():
            losses = meta_arch(batch, teacher_temp=s["teacher_temp"])
        strategy.backward(losses["total"])
        grad_norms = strategy.clip_and_step()
        strategy.zero_grad()
        if not distill:
            strategy.update_teacher(s["momentum"])

        reduced = {k: float(all_reduce_mean(v.detach().float())) for k, v in losses.items()}
        if not math.isfinite(reduced["total"]):
            raise DinoscopeError(f"the loss became {reduced['total']} at iteration {it}; the run stopped cleanly "
                                 "and the last checkpoint is intact", path=run_dir, field="optim.base_lr",
                                 fix="lower optim.base_lr, raise optim.warmup_epochs or use train.precision=fp32")
        if (it + 1) % recipe.train.log_every == 0 or it + 1 == end:
            now = time.perf_counter()
            n_its = recipe.train.log_every if (it + 1) % recipe.train.log_every == 0 else (it + 1 - start) or 1
            images_s = n_its * recipe.train.batch_size_per_rank * env.world_size / max(now - t_last, 1e-9)
            t_last = now
            last = {"iteration": it + 1, **{f"loss/{k}": v for k, v in reduced.items()},
                    **{f"grad_norm/{k}": float(v) for k, v in (grad_norms or {}).items()},
                    **{k: float(v) for k, v in s.items()}, "images_per_s": images_s, "max_memory_mb": _memory_mb()}
            if env.is_main:
                metrics_log.log(**last)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{reduced['total']:.3f}", img_s=f"{images_s:.1f}", mem=f"{_memory_mb():.0f}M")
        if evaluator and (it + 1) % recipe.eval.every == 0:
            last.update(evaluator(meta_arch.teacher["backbone"], it + 1))
        if (it + 1) % recipe.train.checkpoint_every == 0 or it + 1 == total:
            save_training_state(run_dir, it + 1, strategy, loss_state=meta_arch.loss_state(),
                                config=recipe, keep=recipe.train.keep_checkpoints)
            if env.is_main:
                write_loss_curve(metrics_log.path, run_dir / "loss_curve.png")
    return last


def _periodic_knn(recipe: PretrainRecipe, run_dir: Path) -> Any:
    if not (recipe.eval.every and recipe.eval.train and recipe.eval.val):
        return None
    from core.eval.knn import knn_evaluate
    from core.ssl.build import build_data

    train_set, val_set = build_data(recipe.eval.train), build_data(recipe.eval.val)
    eval_log = JsonlLogger(run_dir / "eval_knn.jsonl")
    mean, std = recipe.crops.mean or None, recipe.crops.std or None

    def evaluate(backbone: torch.nn.Module, iteration: int) -> dict[str, float]:
        result = knn_evaluate(backbone, train_set, val_set, ks=list(recipe.eval.ks),
                              size=recipe.crops.global_crops_size, mean=mean, std=std)
        metrics = {f"knn/top1_k{k}": v for k, v in result["top1"].items()}
        eval_log.log(iteration=iteration, **metrics)
        return metrics

    return evaluate
