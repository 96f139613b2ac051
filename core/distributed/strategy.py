"""Training strategies: who owns backward, clipping, the optimizer step, the EMA teacher and model state.

The SSL meta-architecture only computes losses; a :class:`Strategy` does everything that depends on how the job is
distributed. The training loop drives it the same way whatever the backend::

    strategy.setup(student, teacher, param_groups, grad_clip=3.0, precision="bf16")
    for it in ...:
        for group in strategy.param_groups: group["lr"] = ...   # the loop owns the schedules
        with strategy.autocast():
            loss = meta_arch.compute_losses(batch)              # student forward happens in here
        strategy.backward(loss)                                 # grad_accum times per step
        grad_norms = strategy.clip_and_step(compute_norms)      # {sub-module name: pre-clip grad norm}
        strategy.zero_grad()
        strategy.update_teacher(momentum)

Implementations: :class:`SingleProcessStrategy` (plain PyTorch, data parallel over an existing process group) and
``DeepSpeedStrategy`` (ZeRO 1/2/3, in :mod:`core.distributed.deepspeed_strategy`; only
:mod:`core.distributed.deepspeed_backend` imports deepspeed).
:func:`build_strategy` picks one from an explicit name table and imports the DeepSpeed module lazily.

Gradient clipping follows DINOv2 (Oquab et al. 2023, facebookresearch/dinov2 ``train.py``): each direct child of the
student (backbone, dino_head, ibot_head...) is clipped to ``grad_clip`` on its own, not one global norm.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from core.distributed.clipping import check_grad_clip, submodule_parameters
from core.distributed.ema import update_teacher
from core.distributed.env import average_gradients, broadcast_module, get_rank, get_world_size
from core.distributed.precision import Precision, autocast_context, check_precision
from core.distributed.state_files import (
    DEEPSPEED_DIR,
    OPTIMIZER_FILE,
    STUDENT_FILE,
    TEACHER_FILE,
    cpu_state_dict,
    load_module_state,
    load_torch_file,
)
from core.errors import DinoscopeError

log = logging.getLogger(__name__)


@runtime_checkable
class Strategy(Protocol):
    """What the training loop needs from a distribution backend."""

    kind: str  # written into checkpoints; loading refuses a checkpoint of another kind

    def setup(
        self,
        student: nn.Module,
        teacher: nn.Module,
        param_groups: Sequence[Mapping[str, Any]],
        *,
        grad_clip: float | None = None,
        precision: Precision = "fp32",
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
    ) -> None:
        """Take ownership of the modules and build the AdamW optimizer from ``param_groups``.

        ``betas``/``eps`` given here override the constructor's (the loop owns the optimizer settings).
        """

    @property
    def optimizer(self) -> Any:
        """Object with the live ``param_groups`` (a torch optimizer or DeepSpeed's wrapper of one)."""

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Live optimizer groups (custom keys kept) whose ``lr``/``weight_decay`` the loop sets every step."""

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Context for student and teacher forward passes and the loss.

        Student forwards must run through the student's direct children (``student["backbone"](x)``...): the
        DeepSpeed strategy hooks its once-per-micro-batch engine bookkeeping there.
        """

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean-reduced loss (scaled by ``1/grad_accum``)."""

    def clip_and_step(self, compute_norms: bool = True) -> dict[str, torch.Tensor]:
        """Average gradients over ranks, clip each student sub-module, step.

        Returns the pre-clip gradient norm of each sub-module as 0-dim tensors on the training device (no host
        synchronisation): the very values the clip coefficients were computed from. With clipping off and
        ``compute_norms`` false nothing is computed and ``{}`` is returned.
        """

    def zero_grad(self) -> None:
        """Drop the student's gradients after a step."""

    def update_teacher(self, momentum: float) -> None:
        """EMA ``t <- m t + (1 - m) s`` of every teacher parameter from the full student parameter."""

    def save(self, directory: Path) -> None:
        """Write model and optimizer state into ``directory`` (collective: every rank calls it)."""

    def load(self, directory: Path, saved_world_size: int | None = None) -> None:
        """Restore what :meth:`save` wrote (collective), also when it was written at another world size."""

    def full_teacher_state_dict(self) -> dict[str, torch.Tensor]:
        """Complete fp32 teacher state on rank 0 (CPU tensors), ``{}`` on other ranks (collective)."""

    def full_student_state_dict(self) -> dict[str, torch.Tensor]:
        """Complete fp32 student state on rank 0, ``{}`` on other ranks (collective)."""


class ModelsAfterSetup:
    """The student and teacher a strategy received in ``setup``; reading them earlier is a programming error.

    Also records the settings every strategy's ``setup`` receives from the loop.
    """

    _student: nn.Module | None = None
    _teacher: nn.Module | None = None
    betas: tuple[float, float]
    eps: float
    precision: str
    grad_clip: float | None

    def _record_settings(
        self, grad_clip: float | None, precision: Precision, betas: tuple[float, float] | None, eps: float | None
    ) -> None:
        """Checked clipping and precision; ``betas``/``eps`` given to ``setup`` override the constructor's."""
        self.betas = self.betas if betas is None else (float(betas[0]), float(betas[1]))
        self.eps = self.eps if eps is None else float(eps)
        self.precision = check_precision(precision)
        self.grad_clip = check_grad_clip(grad_clip)

    @property
    def student(self) -> nn.Module:
        """The student given to ``setup`` (backbone and heads); raises ``RuntimeError`` before it."""
        if self._student is None:
            raise RuntimeError("call setup() first")
        return self._student

    @property
    def teacher(self) -> nn.Module:
        """The EMA teacher given to ``setup``; raises ``RuntimeError`` before it."""
        if self._teacher is None:
            raise RuntimeError("call setup() first")
        return self._teacher


class SingleProcessStrategy(ModelsAfterSetup):
    """Plain PyTorch training, data parallel when a process group with several ranks exists.

    Data parallelism is done by averaging gradients with bucketed all-reduces at the step (after all micro-batches),
    the same arithmetic as DDP's mean. DDP itself is not used because the student is a ``ModuleDict`` without a
    ``forward``, its sub-modules run several times per step (global and local crops) and some heads may be idle in a
    step; the price is that communication does not overlap with backward. Parameters and buffers are broadcast
    from rank 0 at setup so every rank starts from the same weights.

    Args:
        grad_accum: micro-batches per optimizer step; each loss is scaled by ``1/grad_accum``.
        betas, eps: AdamW hyper-parameters (DINOv2: (0.9, 0.999), 1e-8).
        data_parallel: average gradients over the process group; default: when one with >1 ranks exists.
    """

    kind = "single"

    def __init__(
        self,
        *,
        grad_accum: int = 1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        data_parallel: bool | None = None,
    ) -> None:
        if grad_accum < 1:
            raise DinoscopeError(f"grad_accum must be >= 1, got {grad_accum}", field="grad_accum")
        self.grad_accum = int(grad_accum)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self._data_parallel_arg = data_parallel
        self.data_parallel = False
        self.grad_clip: float | None = None
        self.precision = "fp32"
        self._student: nn.Module | None = None
        self._teacher: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._scaler: torch.amp.GradScaler | None = None

    # -- setup -------------------------------------------------------------------------------------------------
    def setup(
        self,
        student: nn.Module,
        teacher: nn.Module,
        param_groups: Sequence[Mapping[str, Any]],
        *,
        grad_clip: float | None = None,
        precision: Precision = "fp32",
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
    ) -> None:
        """See :meth:`Strategy.setup`; broadcasts rank 0's weights when data parallel, adds a GradScaler for fp16."""
        self._record_settings(grad_clip, precision, betas, eps)
        self._student, self._teacher = student, teacher
        teacher.requires_grad_(False)
        world = get_world_size()
        self.data_parallel = world > 1 if self._data_parallel_arg is None else bool(self._data_parallel_arg)
        if self.data_parallel and world > 1:
            broadcast_module(student)
            broadcast_module(teacher)
        self._optimizer = torch.optim.AdamW([dict(g) for g in param_groups], betas=self.betas, eps=self.eps)
        if self.precision == "fp16":
            self._scaler = torch.amp.GradScaler(self._device_type())
        log.info(
            "single-process strategy: precision %s, grad_clip %s per sub-module, data parallel over %d rank(s)",
            self.precision,
            self.grad_clip,
            world if self.data_parallel else 1,
        )

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The ``torch.optim.AdamW`` built by ``setup``."""
        if self._optimizer is None:
            raise RuntimeError("call setup() first")
        return self._optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The AdamW's live ``param_groups``."""
        return self.optimizer.param_groups

    def _device_type(self) -> str:
        first = next(self.student.parameters(), None)
        return "cpu" if first is None else first.device.type

    # -- step --------------------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """``torch.autocast`` for bf16/fp16 on the student's device type; no-op for fp32."""
        return autocast_context(self.precision, self._device_type())

    def backward(self, loss: torch.Tensor) -> None:
        """``backward`` of ``loss / grad_accum`` (loss-scaled for fp16)."""
        loss = loss / self.grad_accum if self.grad_accum > 1 else loss
        if self._scaler is not None:
            loss = self._scaler.scale(loss)
        loss.backward()

    def clip_and_step(self, compute_norms: bool = True) -> dict[str, torch.Tensor]:
        """See :meth:`Strategy.clip_and_step`: all-reduce, unscale (fp16), clip per sub-module, step."""
        if self.data_parallel and get_world_size() > 1:
            # reduce before unscaling so an inf on any rank makes every rank skip the step
            average_gradients(list(self.student.parameters()))
        if self._scaler is not None:
            self._scaler.unscale_(self.optimizer)
        norms: dict[str, torch.Tensor] = {}
        if self.grad_clip is not None or compute_norms:
            for name, params in submodule_parameters(self.student).items():
                with_grad = [p for p in params if p.grad is not None]
                if not with_grad:
                    continue
                if self.grad_clip is None:
                    norms[name] = torch.nn.utils.get_total_norm([p.grad for p in with_grad], foreach=True)
                else:
                    norms[name] = torch.nn.utils.clip_grad_norm_(with_grad, self.grad_clip, foreach=True)
        if self._scaler is not None:
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
            self.optimizer.step()
        return norms

    def zero_grad(self) -> None:
        """Set the student's gradients to None."""
        self.optimizer.zero_grad(set_to_none=True)

    def update_teacher(self, momentum: float) -> None:
        """EMA of the student into the teacher (:func:`core.distributed.ema.update_teacher`)."""
        update_teacher(self.teacher, self.student, momentum)

    # -- state -------------------------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Rank 0 writes ``student.pt``, ``teacher.pt`` and ``optimizer.pt`` (with the fp16 scaler)."""
        directory = Path(directory)
        if get_rank() == 0:  # every rank holds identical state
            torch.save(cpu_state_dict(self.student), directory / STUDENT_FILE)
            torch.save(cpu_state_dict(self.teacher), directory / TEACHER_FILE)
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scaler": None if self._scaler is None else self._scaler.state_dict(),
                },
                directory / OPTIMIZER_FILE,
            )

    def load(self, directory: Path, saved_world_size: int | None = None) -> None:
        """Load what :meth:`save` wrote; every rank holds full state, so any saved world size loads."""
        directory = Path(directory)
        if not (directory / STUDENT_FILE).is_file() and (directory / DEEPSPEED_DIR).is_dir():
            raise DinoscopeError(
                "this checkpoint was written by the DeepSpeed strategy",
                path=directory,
                field="strategy",
                fix="resume with strategy 'deepspeed' and the same zero_stage",
            )
        load_module_state(
            self.student, load_torch_file(directory / STUDENT_FILE, "student"), directory / STUDENT_FILE, "student"
        )
        load_module_state(
            self.teacher, load_torch_file(directory / TEACHER_FILE, "teacher"), directory / TEACHER_FILE, "teacher"
        )
        state = load_torch_file(directory / OPTIMIZER_FILE, "optimizer")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise DinoscopeError(
                f"the optimizer state does not match the parameter groups ({err})",
                path=directory / OPTIMIZER_FILE,
                field="optimizer",
                fix="resume with the same model and parameter-group settings",
            ) from None
        if self._scaler is not None and state.get("scaler"):
            self._scaler.load_state_dict(state["scaler"])

    def full_teacher_state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copy of the teacher state on rank 0, ``{}`` elsewhere."""
        return cpu_state_dict(self.teacher) if get_rank() == 0 else {}

    def full_student_state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copy of the student state on rank 0, ``{}`` elsewhere."""
        return cpu_state_dict(self.student) if get_rank() == 0 else {}


# Options of the DeepSpeed strategy that a recipe's dist section always carries; meaningless without ZeRO.
_DEEPSPEED_ONLY = frozenset(
    {
        "zero_stage",
        "offload",
        "micro_batch_size",
        "ds_overrides",
        "module_grad_norms",
        "ema_gather_numel",
        "load_universal",
        "overlap_comm",
        "contiguous_gradients",
        "reduce_bucket_size",
        "allgather_bucket_size",
        "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold",
        "stage3_max_live_parameters",
        "stage3_max_reuse_distance",
    }
)


def _single(**kwargs: Any) -> Strategy:
    ignored = sorted(_DEEPSPEED_ONLY.intersection(kwargs))
    if kwargs.get("offload"):
        log.warning("dist.offload is ignored by the single-process strategy")
    if ignored:
        log.debug("single-process strategy ignores %s", ignored)
    return SingleProcessStrategy(**{k: v for k, v in kwargs.items() if k not in _DEEPSPEED_ONLY})


def _deepspeed(**kwargs: Any) -> Strategy:
    try:
        module = importlib.import_module("core.distributed.deepspeed_strategy")  # deferred: optional extra [dist]
    except ImportError as err:
        raise DinoscopeError(
            f"strategy 'deepspeed' needs the deepspeed package ({err})",
            field="dist.strategy",
            fix="pip install 'dinoscope[dist]', or use strategy 'single'",
        ) from None
    return module.DeepSpeedStrategy(**kwargs)


STRATEGIES: dict[str, Callable[..., Strategy]] = {"single": _single, "deepspeed": _deepspeed}


def build_strategy(name: str, **kwargs: Any) -> Strategy:
    """Build a strategy by name (``single`` or ``deepspeed``); keyword arguments go to its constructor."""
    if name not in STRATEGIES:
        raise DinoscopeError(
            f"unknown strategy {name!r}", field="dist.strategy", fix=f"use one of {', '.join(sorted(STRATEGIES))}"
        )
    try:
        return STRATEGIES[name](**kwargs)
    except TypeError as err:
        raise DinoscopeError(
            f"bad options for strategy {name!r}: {err}", field="dist", fix="check the dist section"
        ) from None
