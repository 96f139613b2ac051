"""The pretraining loop: flat and readable (nanoGPT style), iteration-based and resumable.

open the run directory (lock, recipe check, resume point)              core.train.session
place the meta-architecture on the device; build the strategy          core.distributed
for it in range(start, total):
    schedules[it] -> optimizer groups
    grad_accum x (place batch, teacher targets, student logits, losses, backward)   core.ssl.SSLMetaArch
    clip per sub-module, step, EMA                                     core.distributed strategy
    one all-reduce: losses + stop request; NaN guard; log JSONL, progress, kNN, checkpoint
    on SIGTERM/SIGUSR2: checkpoint at this iteration, then stop (or requeue under submitit)
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from core.config.pretrain import PretrainRecipe
from core.distributed.device import activate, place, place_module, resolve_device, wants_pinned_memory
from core.distributed.env import get_world_size, has_process_group, init_distributed
from core.distributed.strategy import Strategy, build_strategy
from core.errors import DinoscopeError
from core.logging import JsonlLogger, TensorBoardLog, progress
from core.ssl.build import build_augmentation, build_data, build_meta_arch, preflight
from core.train.checkpoint import load_training_state, save_training_state
from core.train.data import ChannelsAsSamples, build_ssl_loader
from core.train.param_groups import apply_optim_schedule, fuse_params_groups, get_params_groups_with_decay
from core.train.preemption import StopRequest
from core.train.report import write_loss_curve
from core.train.schedules import build_schedules, scaled_lr
from core.train.session import METRICS_FILE, RunSession

log = logging.getLogger(__name__)

Evaluator = Callable[[torch.nn.Module, int], dict[str, float]]


def _param_groups(meta_arch: Any, recipe: PretrainRecipe) -> list[dict]:
    groups: list[dict] = []
    for name, module in meta_arch.student.items():
        decay = recipe.optim.layerwise_decay if name == "backbone" else 1.0
        mult = recipe.optim.patch_embed_lr_mult if name == "backbone" else 1.0
        groups += get_params_groups_with_decay(module, lr_decay_rate=decay, patch_embed_lr_mult=mult)
    return fuse_params_groups(groups)


def _schedules(recipe: PretrainRecipe, world_size: int) -> tuple[Any, float]:
    """Per-iteration schedules; recipe durations in epochs are converted to whole iterations here.

    The learning rate scales with the images per optimizer step: per rank x ranks x accumulated micro-batches.
    """
    o, t = recipe.optim, recipe.teacher
    lr = scaled_lr(
        o.base_lr, recipe.train.batch_size_per_rank * recipe.dist.grad_accum, world_size, rule=o.scaling_rule
    )

    def iters(epochs: float) -> int:
        return int(round(epochs * o.epoch_length))

    return build_schedules(
        base_lr=lr,
        min_lr=o.min_lr,
        epochs=recipe.total_iters(),
        warmup_epochs=iters(o.warmup_epochs),
        epoch_length=1,
        weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end,
        momentum_teacher=t.momentum_teacher,
        final_momentum_teacher=t.final_momentum_teacher,
        warmup_teacher_temp=t.warmup_teacher_temp,
        teacher_temp=t.teacher_temp,
        warmup_teacher_temp_epochs=iters(t.warmup_teacher_temp_epochs),
        freeze_last_layer_epochs=iters(o.freeze_last_layer_epochs),
    ), lr


def build_recipe_strategy(recipe: PretrainRecipe, *, resharding: bool = False) -> Strategy:
    """The recipe's ``dist`` section as a strategy (``resharding``: the checkpoint has another world size)."""
    d = recipe.dist
    if d.strategy != "deepspeed":
        return build_strategy("single", grad_accum=d.grad_accum)
    return build_strategy(
        "deepspeed",
        zero_stage=d.zero_stage,
        offload=d.offload,
        micro_batch_size=recipe.train.batch_size_per_rank,
        grad_accum=d.grad_accum,
        ema_gather_numel=d.ema_gather_numel,
        ds_overrides=dict(d.deepspeed_overrides),
        overlap_comm=d.overlap_comm,
        contiguous_gradients=d.contiguous_gradients,
        reduce_bucket_size=d.reduce_bucket_size,
        allgather_bucket_size=d.allgather_bucket_size,
        stage3_prefetch_bucket_size=d.stage3_prefetch_bucket_size,
        stage3_param_persistence_threshold=d.stage3_param_persistence_threshold,
        stage3_max_live_parameters=d.stage3_max_live_parameters,
        stage3_max_reuse_distance=d.stage3_max_reuse_distance,
        load_universal=resharding,
    )


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reduce(losses: torch.Tensor, stop: StopRequest) -> tuple[list[float], int]:
    """Mean of the loss terms over ranks and the stop request of any rank, in one all-reduce and one host sync."""
    packed = torch.cat([losses.float(), losses.new_tensor([float(stop.signum or 0)])])
    if has_process_group() and get_world_size() > 1:
        dist.all_reduce(packed)
        packed[:-1] /= get_world_size()
    values = packed.tolist()
    return values[:-1], int(values[-1])


def train(
    recipe: PretrainRecipe,
    run_dir: str | os.PathLike,
    *,
    resume: bool = True,
    stop_after: int | None = None,
    allow_recipe_change: bool = False,
    recipe_path: str | None = None,
    overrides: list[str] | None = None,
    evaluator: Evaluator | None = None,
) -> dict[str, Any]:
    """Pretrain (or distil) as the recipe says; returns the last logged metrics.

    ``evaluator(teacher_backbone, iteration) -> metrics`` runs every ``eval.every`` iterations on every rank (the
    periodic kNN of ``core.eval.periodic``, built by the caller so that training does not depend on evaluation).
    ``stop_after`` ends the run early after that many iterations of this call (tests use it to simulate a crash).

    Raises:
        DinoscopeError: the run directory is locked by another run, the recipe changed since the checkpoint
            (without ``allow_recipe_change``), a setting is impossible here, or the loss became NaN.
        TrainingInterrupted: SIGTERM/SIGUSR2 arrived; a checkpoint at the reached iteration was saved first.
    """
    preflight(recipe)  # nothing is written to the run directory before the recipe can run
    device = resolve_device(recipe.train.device)
    activate(device)  # before the process group: NCCL binds each rank to its GPU
    env = init_distributed("nccl" if device.type == "cuda" else "gloo")
    session = RunSession(
        run_dir,
        recipe,
        env,
        resume=resume,
        allow_recipe_change=allow_recipe_change,
        recipe_path=recipe_path,
        overrides=overrides,
    )
    point = session.open()
    try:
        return _train(recipe, Path(run_dir), env, device, point, stop_after, evaluator)
    finally:
        session.close()


def _train(
    recipe: PretrainRecipe,
    run_dir: Path,
    env: Any,
    device: torch.device,
    point: Any,
    stop_after: int | None,
    evaluator: Evaluator | None,
) -> dict[str, Any]:
    torch.manual_seed(recipe.train.seed + env.rank)
    dataset = build_data(recipe.data)
    if recipe.model.channel_adaptive:
        dataset = ChannelsAsSamples(dataset)
    meta_arch = place_module(build_meta_arch(recipe), device)  # student, teacher, heads and loss centres
    schedules, lr = _schedules(recipe, env.world_size)
    total, accum = recipe.total_iters(), recipe.dist.grad_accum
    strategy = build_recipe_strategy(recipe, resharding=point.resharding(env.world_size))
    strategy.setup(
        meta_arch.student,
        meta_arch.teacher,
        _param_groups(meta_arch, recipe),
        grad_clip=recipe.optim.clip_grad or None,
        precision=recipe.train.precision,
        betas=(recipe.optim.adamw_beta1, recipe.optim.adamw_beta2),
    )
    start, samples_seen = point.iteration, point.samples_seen
    if point.checkpoint is not None:
        state = load_training_state(point.checkpoint, strategy)
        meta_arch.load_loss_state(place(state["loss_state"], device))
        log.info("resumed from %s at iteration %d (sample %d)", point.checkpoint, start, samples_seen)
    t = recipe.train
    loader = build_ssl_loader(
        dataset,
        build_augmentation(recipe.crops, recipe.model),
        batch_size=t.batch_size_per_rank,
        global_crops_size=recipe.crops.global_crops_size,
        patch_size=recipe.model.patch_size,
        mask_ratio=tuple(recipe.ibot.mask_ratio_min_max),
        mask_probability=recipe.ibot.mask_sample_probability,
        seed=t.seed,
        rank=env.rank,
        world_size=env.world_size,
        start_position=samples_seen,
        num_workers=t.num_workers,
        pin_memory=wants_pinned_memory(device, t.pin_memory),
        persistent_workers=t.persistent_workers,
        prefetch_factor=t.prefetch_factor,
    )
    global_batch = t.batch_size_per_rank * env.world_size * accum
    metrics_log = JsonlLogger(run_dir / METRICS_FILE)
    distill = bool(recipe.distill.teacher_weights)
    log.info(
        "training %d iterations from %d on %s; world size %d x %d micro-batches of %d; scaled lr %.3g; %s",
        total,
        start,
        device,
        env.world_size,
        accum,
        t.batch_size_per_rank,
        lr,
        recipe.dist.strategy,
    )
    batches = iter(loader)
    last: dict[str, Any] = {}
    end = total if stop_after is None else min(total, start + stop_after)
    t_last, it_last = time.perf_counter(), start
    bar = progress(range(start, end), total=total, initial=start, desc="pretrain", unit="it")
    board = TensorBoardLog(run_dir / "tensorboard") if t.tensorboard and env.is_main else None
    with StopRequest() as stop:
        for it in bar:
            s = schedules.at(it)
            apply_optim_schedule(strategy.optimizer, s["lr"], s["wd"], s["last_layer_lr"])
            log_step = (it + 1) % t.log_every == 0 or it + 1 == end
            summed: torch.Tensor | None = None
            for _ in range(accum):
                batch = place(next(batches), device)
                with strategy.autocast():
                    losses = meta_arch(batch, teacher_temp=s["teacher_temp"])
                strategy.backward(losses["total"])
                terms = torch.stack([v.detach().float() for v in losses.values()])
                summed = terms if summed is None else summed + terms
            grad_norms = strategy.clip_and_step(compute_norms=log_step and t.log_grad_norms)
            strategy.zero_grad()
            if not distill:
                strategy.update_teacher(s["momentum"])
            assert summed is not None
            values, stop_signal = _reduce(summed / accum, stop)
            reduced = dict(zip(losses.keys(), values, strict=True))
            samples_seen += global_batch
            if not math.isfinite(reduced["total"]):
                raise DinoscopeError(
                    f"the loss became {reduced['total']} at iteration {it}; the run stopped "
                    "cleanly and the last checkpoint is intact",
                    path=run_dir,
                    field="optim.base_lr",
                    fix="lower optim.base_lr, raise optim.warmup_epochs or use train.precision=fp32",
                )
            if stop_signal and not stop.requested:
                stop.request(stop_signal)  # another rank received the signal
            if log_step:
                now = time.perf_counter()
                images_s = (it + 1 - it_last) * global_batch / max(now - t_last, 1e-9)
                t_last, it_last = now, it + 1
                last = {
                    "iteration": it + 1,
                    **{f"loss/{k}": v for k, v in reduced.items()},
                    **{f"grad_norm/{k}": float(v) for k, v in grad_norms.items()},
                    **{k: float(v) for k, v in s.items()},
                    "images_per_s": images_s,
                    "max_memory_mb": _memory_mb(device),
                }
                if env.is_main:
                    metrics_log.log(**last)
                    if board is not None:
                        board.log(it + 1, last)
                bar.set_postfix(
                    loss=f"{reduced['total']:.3f}",
                    lr=f"{s['lr']:.2e}",
                    img_s=f"{images_s:.1f}",
                    mem=f"{_memory_mb(device):.0f}M",
                )
            if evaluator is not None and recipe.eval.every and (it + 1) % recipe.eval.every == 0:
                last.update(evaluator(meta_arch.teacher["backbone"], it + 1))
            saved = None
            if (it + 1) % t.checkpoint_every == 0 or it + 1 == total or stop.requested:
                saved = save_training_state(
                    run_dir,
                    it + 1,
                    strategy,
                    loss_state=meta_arch.loss_state(),
                    config=recipe,
                    sampler_state={"samples_seen": samples_seen},
                    keep=t.keep_checkpoints,
                )
                if env.is_main:
                    write_loss_curve(metrics_log.path, run_dir / "loss_curve.png")
            if stop.requested:
                if board is not None:
                    board.close()
                stop.finish(it + 1, saved)
    if board is not None:
        board.close()
    return last
