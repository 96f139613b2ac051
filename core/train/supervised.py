"""One trainer for heads on frozen features: an lr grid, validation each epoch, early stopping, a JSONL log, a plot.

It serves the DINOv2 linear probe (:mod:`core.eval.linear`), canopy-height heads (:mod:`geodino.fit`) and phenotype
heads (:mod:`bio.heads`). What only the domain knows comes in as callables:

* ``make_head()`` builds the trainable module. It is called once per lr under ``torch.manual_seed(seed)``, so every
  lr of the grid starts from the same initialisation.
* ``loss_fn(head, batch)`` returns the loss of one batch (already moved to the device with
  :func:`core.distributed.device.place`), or ``(loss, weight)`` to weight it in the logged epoch mean (valid pixels,
  say), or ``None`` to skip the batch without an optimizer or scheduler step.
* ``metric_fn(head, val)`` returns validation metrics ``{name: float}``. It runs in eval mode without gradients and
  gets the validation source as given, placing its batches itself (:func:`core.distributed.device.module_device`).

Batches come from a :class:`BatchSource` (``len`` counts samples; ``batches(batch_size, shuffle, generator)``):
:class:`TensorSource` for in-memory ``(x, y)``, or any domain object with that method (geodino's feature cache and
live chips). Each lr reshuffles from a generator seeded with ``seed``, so all lrs see the same batch order and the
same seed gives the same result.

The lr follows ``constant`` or ``cosine`` per optimizer step, after an optional linear warm-up: the half-cosine decay
to 0 of SGDR (Loshchilov & Hutter, arXiv:1608.03983), which the DINOv2 linear probe uses (Oquab et al.,
arXiv:2304.07193, Sec. 7).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from core.distributed.device import place, place_module
from core.errors import DinoscopeError
from core.logging import JsonlLogger, progress
from core.plots import loss_curves

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], Tensor | tuple[Tensor, float] | None]
MetricFn = Callable[[nn.Module, Any], Mapping[str, float]]
ParamGroupsFn = Callable[[nn.Module, float], list[dict[str, Any]]]


class BatchSource(Protocol):
    """Training or validation data: ``len`` samples, served in batches (shuffled when asked, from ``generator``)."""

    def __len__(self) -> int: ...

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[Any]:
        """Batches of ``batch_size`` samples (the last may be smaller), shuffled with ``generator`` if asked."""


class TensorSource:
    """In-memory features ``x [N, ...]`` and targets ``y [N, ...]``; batches are ``(x[idx], y[idx])`` tuples."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        if len(x) != len(y):
            raise DinoscopeError(
                f"{len(x)} feature rows but {len(y)} targets", field="y", fix="give one target per feature row"
            )
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """``(x[idx], y[idx])`` batches of ``batch_size`` rows, shuffled with ``generator`` if asked."""
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for idx in order.split(batch_size):
            yield self.x[idx], self.y[idx]


@dataclass
class SupervisedConfig:
    """Hyper-parameters of :func:`train_supervised`; :meth:`validate` checks their ranges."""

    lrs: Sequence[float] = (1e-3,)  # every lr is trained from the same init; the best on validation wins
    epochs: int = 10
    batch_size: int = 256
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | sgd (with momentum)
    momentum: float = 0.9  # sgd only
    schedule: str = "constant"  # constant | cosine (to 0 at the last step)
    warmup_epochs: float = 0.0  # linear warm-up, at least one step when > 0
    patience: int | None = None  # stop after this many epochs without a better validation metric; None: never
    restore_best: bool = True  # keep the best validation epoch's weights; False: the last epoch's
    select: str = "loss"  # the metric_fn key that picks the epoch and the lr
    mode: str = "min"  # min | max: which direction of `select` is better
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`DinoscopeError` naming the first out-of-range setting."""
        if not self.lrs or not all(math.isfinite(lr) and lr > 0 for lr in self.lrs):
            raise DinoscopeError(
                f"learning rates must be positive and finite, got {list(self.lrs)}",
                field="lrs",
                fix="give at least one lr > 0, e.g. [1e-3]",
            )
        checks = {"epochs": (self.epochs, 1), "batch_size": (self.batch_size, 1)}
        if self.patience is not None:
            checks["patience"] = (self.patience, 1)
        for name, (value, low) in checks.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise DinoscopeError(f"{name} must be an integer >= {low}, got {value!r}", field=name)
        for name, value in (("weight_decay", self.weight_decay), ("warmup_epochs", self.warmup_epochs)):
            if not (math.isfinite(value) and value >= 0):
                raise DinoscopeError(f"{name} must be >= 0, got {value}", field=name)
        if not 0 <= self.momentum < 1:
            raise DinoscopeError(f"momentum must lie in [0, 1), got {self.momentum}", field="momentum")
        for name, value, choices in (
            ("optimizer", self.optimizer, ("adamw", "sgd")),
            ("schedule", self.schedule, ("constant", "cosine")),
            ("mode", self.mode, ("min", "max")),
        ):
            if value not in choices:
                raise DinoscopeError(f"unknown {name} {value!r}", field=name, fix=f"use one of {', '.join(choices)}")


@dataclass
class SupervisedResult:
    """What :func:`train_supervised` found.

    Attributes:
        head: the fitted module of the best lr, holding the kept state, in eval mode.
        best_lr: the lr chosen on validation (the only lr without a grid).
        best_epoch: the epoch whose weights were kept (1-based).
        best_metric: the ``select`` metric of that epoch (``None`` without validation).
        state_dict: a CPU copy of ``head``'s kept state.
        history: one record per (lr, epoch), as logged: ``lr, epoch, train_loss, val_*, last_lr``.
        per_lr: per lr, in grid order: ``lr, metric, best_epoch, epochs_run, val`` (metrics of the kept epoch).
    """

    head: nn.Module
    best_lr: float
    best_epoch: int
    best_metric: float | None
    state_dict: dict[str, Tensor]
    history: list[dict[str, Any]]
    per_lr: list[dict[str, Any]]


def train_supervised(
    make_head: Callable[[], nn.Module],
    train: BatchSource | tuple[Tensor, Tensor],
    loss_fn: LossFn,
    config: SupervisedConfig | None = None,
    *,
    val: Any = None,
    metric_fn: MetricFn | None = None,
    param_groups: ParamGroupsFn | None = None,
    device: torch.device | str = "cpu",
    log_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    plot_ylabel: str = "loss",
    desc: str = "fit",
    show_progress: bool = True,
) -> SupervisedResult:
    """Train one head per lr of ``config.lrs``, validating every epoch, and keep the best (see the module docstring).

    Args:
        make_head: builds a fresh trainable module (a new one per lr when the grid has several).
        train: a :class:`BatchSource`, or in-memory ``(x, y)`` tensors.
        loss_fn: ``(head, batch) -> loss | (loss, weight) | None``.
        config: hyper-parameters (defaults: :class:`SupervisedConfig`).
        val, metric_fn: the validation source and ``(head, val) -> {name: value}``; needed for an lr grid or early
            stopping. Without them every lr runs all epochs and keeps its last weights.
        param_groups: ``(head, lr) -> optimizer groups`` (e.g. a smaller lr for a fine-tuned backbone); default:
            one group of the head's trainable parameters at ``lr``.
        device: where the head trains; batches are moved there with :func:`core.distributed.device.place`.
        log_path: JSONL file, rewritten for this fit, one line per (lr, epoch).
        plot_path: PNG of the training (and, when ``metric_fn`` returns ``loss``, validation) loss per epoch and lr.
        plot_ylabel: the plot's y label (the loss and its unit).
        desc, show_progress: progress-bar label, and whether to show it (``core.logging.progress`` rules apply).
    """
    cfg = config or SupervisedConfig()
    cfg.validate()
    if (val is None) != (metric_fn is None):
        raise ValueError("pass both val and metric_fn, or neither")
    if val is None and (len(cfg.lrs) > 1 or cfg.patience is not None):
        raise DinoscopeError(
            "choosing among several lrs or stopping early needs validation data",
            field="lrs",
            fix="give a validation source and metric, or a single lr without patience",
        )
    source = TensorSource(*train) if isinstance(train, (tuple, list)) else train
    device = torch.device(device)
    logger = None
    if log_path is not None:
        Path(log_path).unlink(missing_ok=True)  # one fit, one log: nothing resumes a head fit
        logger = JsonlLogger(log_path)
    runs: list[tuple[nn.Module, dict[str, Any], list[dict[str, Any]]]] = []
    best: tuple[nn.Module, dict[str, Any]] | None = None
    for lr in cfg.lrs:
        head, summary, rows = _fit_one_lr(
            make_head,
            float(lr),
            source,
            loss_fn,
            cfg,
            val,
            metric_fn,
            param_groups,
            device,
            logger,
            f"{desc} lr={lr:g}" if len(cfg.lrs) > 1 else desc,
            show_progress,
        )
        if any(head is earlier for earlier, _, _ in runs):
            raise ValueError("make_head returned a module it had returned before; each lr needs a fresh head")
        runs.append((head, summary, rows))
        if best is None or _better(summary["metric"], best[1]["metric"], cfg.mode):
            best = (head, summary)
    assert best is not None  # lrs is non-empty (validated)
    head, summary = best
    if plot_path is not None:
        _plot([(s["lr"], rows) for _, s, rows in runs], plot_path, plot_ylabel)
    log.info(
        "%s: best lr %g, epoch %d, %s %s", desc, summary["lr"], summary["best_epoch"], cfg.select, summary["metric"]
    )
    return SupervisedResult(
        head=head.eval(),
        best_lr=summary["lr"],
        best_epoch=summary["best_epoch"],
        best_metric=summary["metric"],
        state_dict=_cpu_state(head),
        history=[r for _, _, rows in runs for r in rows],
        per_lr=[s for _, s, _ in runs],
    )


def _fit_one_lr(
    make_head: Callable[[], nn.Module],
    lr: float,
    source: BatchSource,
    loss_fn: LossFn,
    cfg: SupervisedConfig,
    val: Any,
    metric_fn: MetricFn | None,
    param_groups: ParamGroupsFn | None,
    device: torch.device,
    logger: JsonlLogger | None,
    desc: str,
    show_progress: bool,
) -> tuple[nn.Module, dict[str, Any], list[dict[str, Any]]]:
    """Train one head at ``lr``; returns it (holding the kept state), its summary and its per-epoch records."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    # The seed governs init and any randomness inside the head (dropout), without disturbing the caller's stream.
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.seed)
        head = place_module(make_head(), device)
        groups = (
            param_groups(head, lr)
            if param_groups
            else [{"params": [p for p in head.parameters() if p.requires_grad], "lr": lr}]
        )
        if cfg.optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(
                groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        else:
            optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        steps = math.ceil(len(source) / cfg.batch_size)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg, steps))
        generator = torch.Generator().manual_seed(cfg.seed)
        rows: list[dict[str, Any]] = []
        kept_state, kept_epoch, kept_metric, kept_val, stale = None, 0, None, {}, 0
        bar = progress(
            range(1, cfg.epochs + 1), total=cfg.epochs, desc=desc, unit="epoch", disable=None if show_progress else True
        )
        for epoch in bar:
            record: dict[str, Any] = {
                "lr": lr,
                "epoch": epoch,
                "train_loss": _train_epoch(
                    head, source, loss_fn, optimizer, scheduler, generator, cfg.batch_size, device
                ),
            }
            metrics = _validate(head, val, metric_fn, cfg.select) if metric_fn is not None else {}
            record.update({f"val_{k}": v for k, v in metrics.items()})
            record["last_lr"] = scheduler.get_last_lr()[0]
            rows.append(record)
            if logger is not None:
                logger.log(**record)
            if not metrics:
                continue
            if _better(metrics[cfg.select], kept_metric, cfg.mode):
                kept_epoch, kept_metric, kept_val, stale = epoch, metrics[cfg.select], metrics, 0
                kept_state = _cpu_state(head) if cfg.restore_best else None
            else:
                stale += 1
                if cfg.patience is not None and stale >= cfg.patience:
                    break
        bar.close()  # type: ignore[attr-defined]  # ends the tqdm bar when early stopping leaves it unfinished
    if kept_state is not None:
        head.load_state_dict(kept_state)
    else:  # the last epoch is kept: by request, without validation, or when no epoch gave a finite metric
        kept_epoch, kept_val = len(rows), metrics
        kept_metric = metrics.get(cfg.select) if metrics else None
    summary = {"lr": lr, "metric": kept_metric, "best_epoch": kept_epoch, "epochs_run": len(rows), "val": kept_val}
    return head, summary, rows


def _train_epoch(
    head: nn.Module,
    source: BatchSource,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    batch_size: int,
    device: torch.device,
) -> float:
    """One pass over shuffled batches; returns the (weighted) mean loss, NaN when every batch was skipped."""
    head.train()
    total, weight = 0.0, 0.0
    for batch in source.batches(batch_size, shuffle=True, generator=generator):
        out = loss_fn(head, place(batch, device))
        if out is None:
            continue
        loss, w = out if isinstance(out, tuple) else (out, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += float(loss.detach()) * float(w)
        weight += float(w)
    return total / weight if weight else float("nan")


def _validate(head: nn.Module, val: Any, metric_fn: MetricFn, select: str) -> dict[str, float]:
    head.eval()
    with torch.no_grad():
        metrics = {k: float(v) for k, v in metric_fn(head, val).items()}
    if select not in metrics:
        raise DinoscopeError(
            f"the validation metrics {sorted(metrics)} have no {select!r}",
            field="select",
            fix="select one of the metrics that metric_fn returns",
        )
    return metrics


def _lr_factor(cfg: SupervisedConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step ``s``: linear warm-up, then constant or half-cosine to 0."""
    total = cfg.epochs * steps_per_epoch
    warmup = max(1, int(cfg.warmup_epochs * steps_per_epoch)) if cfg.warmup_epochs > 0 else 0

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if cfg.schedule == "constant":
            return warm
        return warm * 0.5 * (1 + math.cos(math.pi * max(0, step - warmup) / max(1, total - warmup)))

    return factor


def _better(value: float | None, than: float | None, mode: str) -> bool:
    """Strictly better (ties keep the earlier epoch or lr); NaN is never better, anything beats nothing."""
    if value is None or math.isnan(value):
        return False
    if than is None or math.isnan(than):
        return True
    return value < than if mode == "min" else value > than


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _plot(runs: list[tuple[float, list[dict[str, Any]]]], path: str | os.PathLike, ylabel: str) -> Path:
    """Training loss (solid) and validation loss (dashed, when logged) per epoch, one colour per lr."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    styles: dict[str, dict[str, Any]] = {}
    for i, (lr, rows) in enumerate(runs):
        suffix = f" lr={lr:g}" if len(runs) > 1 else ""
        epochs = [r["epoch"] for r in rows]
        marker = {"marker": "o", "ms": 3} if len(rows) <= 50 else {}
        for name, key, line in (("train", "train_loss", "-"), ("validation", "val_loss", "--")):
            if rows and key in rows[0]:
                series[name + suffix] = (epochs, [r[key] for r in rows])
                styles[name + suffix] = {"color": f"C{i % 10}", "ls": line, "lw": 1.2, **marker}
    return loss_curves(series, path, xlabel="epoch", ylabel=ylabel, styles=styles, size=(6.0, 4.0))
