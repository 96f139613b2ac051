"""DeepSpeed ZeRO 1/2/3 strategy (DeepSpeed itself is imported only by :mod:`core.distributed.deepspeed_backend`).

Design (see environment.md §2 for the CPU recipe it follows):

* **Optimizer.** A client ``torch.optim.AdamW`` built from the loop's parameter groups (custom keys such as
  ``lr_multiplier`` survive inside DeepSpeed's wrapper), so no DeepSpeed optimizer op is JIT-compiled. With
  ``offload=True`` that AdamW runs on the CPU copy (``zero_force_ds_cpu_optimizer`` is switched off).
* **Engine root.** DeepSpeed wraps a small root module that owns the student and whose ``forward`` does nothing.
  The meta-architecture calls student sub-modules directly; a pre-forward hook on each of them calls the engine's
  root once per micro-batch, which runs DeepSpeed's per-forward bookkeeping (gradient-hook counters, ZeRO-3
  parameter-trace reset) exactly as ``engine(batch)`` would.
* **Teacher.** Never enters the engine. It is a plain full fp32 module on every rank and is saved as a plain state
  dict, so it can be exported without DeepSpeed. Memory cost: one full model copy per rank on top of the student's
  (1/world of it under ZeRO-3), plus, under ZeRO-3, one transiently gathered bucket of student parameters
  (``ema_gather_numel`` elements) during the EMA. Partition-level EMA would save the teacher copy but is advised
  against by the DeepSpeed maintainers (deepspeedai/DeepSpeed#2056).
* **EMA source.** ZeRO-1/2: the module parameters, which DeepSpeed refreshes from the fp32 master after each step.
  ZeRO-3: the same parameters gathered bucket by bucket with ``deepspeed.zero.GatheredParameters``. fp16: the fp32
  master copy (``safe_get_full_fp32_param``) instead of the rounded fp16 weights.
* **Precision.** ``bf16`` uses DeepSpeed's ``torch_autocast`` mode: fp32 parameters and master weights, bf16 compute
  and bf16 gradient reduction for Linear/Conv weights, as DINOv2's FSDP mixed precision does. ``fp16`` uses
  DeepSpeed's native fp16 mode with dynamic loss scaling (parameters stored in fp16, fp32 masters). The config is
  built and checked in :mod:`core.distributed.deepspeed_config`.
* **Clipping.** Per student sub-module, on each rank's own gradient fragments, never gathering a parameter
  (:mod:`core.distributed.deepspeed_clipping`).
* **Resharding.** A checkpoint written at another world size is converted once to DeepSpeed's universal layout and
  loaded with ``checkpoint.load_universal`` (:mod:`core.distributed.deepspeed_checkpoint`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.distributed.deepspeed_backend import deepspeed, get_accelerator, safe_get_full_fp32_param, skip_shm_comm_op
from core.distributed.deepspeed_checkpoint import UNIVERSAL_TAG, convert_to_universal, universal_client_state
from core.distributed.deepspeed_clipping import global_norms, local_grad_fragments, scale_fragments
from core.distributed.deepspeed_config import build_ds_config, validate_ds_config
from core.distributed.device import module_device
from core.distributed.ema import ema_update_, paired_parameters
from core.distributed.env import barrier, broadcast_module, get_rank, get_world_size, init_distributed
from core.distributed.precision import Precision, autocast_context
from core.distributed.state_files import (
    DEEPSPEED_DIR,
    DEEPSPEED_TAG,
    STUDENT_FILE,
    TEACHER_FILE,
    cpu_state_dict,
    load_module_state,
    load_torch_file,
)
from core.distributed.strategy import ModelsAfterSetup
from core.errors import DinoscopeError

log = logging.getLogger(__name__)


class _EngineRoot(nn.Module):
    """Root module handed to DeepSpeed: owns the student; calling it marks the start of a micro-batch."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self) -> None:
        return None


class DeepSpeedStrategy(ModelsAfterSetup):
    """ZeRO stage 1, 2 or 3 through ``deepspeed.initialize`` (see the module docstring for the design).

    Args:
        zero_stage: 1 (optimizer states), 2 (+ gradients) or 3 (+ parameters) partitioned over ranks.
        offload: keep optimizer states (and, for stage 3, parameters) in CPU memory.
        micro_batch_size: images per rank per micro-batch (DeepSpeed's batch bookkeeping only).
        grad_accum: micro-batches per optimizer step.
        betas, eps: AdamW hyper-parameters.
        module_grad_norms: compute the per-sub-module grad norms returned by :meth:`clip_and_step`.
        ema_gather_numel: ZeRO-3 only: student elements gathered at once for the EMA and full state dicts.
        ds_overrides: extra DeepSpeed config keys, deep-merged over the generated config and logged.
        **zero_kwargs: typed ZeRO knobs of :func:`build_ds_config` (``overlap_comm``, ``reduce_bucket_size``,
            ``stage3_param_persistence_threshold``...).
    """

    kind = "deepspeed"

    def __init__(
        self,
        *,
        zero_stage: int = 2,
        offload: bool = False,
        micro_batch_size: int = 1,
        grad_accum: int = 1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        module_grad_norms: bool = True,
        ema_gather_numel: int = 50_000_000,
        ds_overrides: Mapping[str, Any] | None = None,
        **zero_kwargs: Any,
    ) -> None:
        self.zero_stage = int(zero_stage)
        self.offload = bool(offload)
        self.micro_batch_size = int(micro_batch_size)
        self.grad_accum = int(grad_accum)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.module_grad_norms = module_grad_norms
        self.ema_gather_numel = int(ema_gather_numel)
        self.ds_overrides = dict(ds_overrides or {})
        self.zero_kwargs = zero_kwargs
        # fail on bad arguments now rather than after the process group is up
        build_ds_config(
            zero_stage=self.zero_stage,
            micro_batch_size=self.micro_batch_size,
            grad_accum=self.grad_accum,
            world_size=1,
            grad_clip=None,
            precision="fp32",
            offload=self.offload,
            overrides=self.ds_overrides,
            **zero_kwargs,
        )
        self.precision = "fp32"
        self.grad_clip: float | None = None
        self.ds_config: dict[str, Any] = {}
        self._engine: Any = None
        self._student: nn.Module | None = None
        self._teacher: nn.Module | None = None
        self._micro_batch_open = False

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
        """See :meth:`Strategy.setup`: check device and precision, start DeepSpeed's process group, build the ZeRO
        config and ``deepspeed.initialize`` the student with an AdamW over ``param_groups`` (the teacher stays out)."""
        self._record_settings(grad_clip, precision, betas, eps)
        if self.precision == "fp16" and not get_accelerator().is_fp16_supported():
            raise DinoscopeError(
                "DeepSpeed does not support fp16 on this device",
                field="train.precision",
                fix="use precision bf16 or fp32",
            )
        accelerator = get_accelerator().device_name().split(":")[0]
        placed = module_device(student).type
        if placed != accelerator:
            # DeepSpeed would silently move the student to its accelerator and leave the teacher behind.
            raise DinoscopeError(
                f"the model was placed on {placed}, but DeepSpeed's accelerator is {accelerator}",
                field="train.device",
                fix="set train.device to match (auto picks the GPU when "
                "CUDA exists), or export DS_ACCELERATOR=cpu for a CPU run",
            )
        if accelerator == "cpu":
            skip_shm_comm_op()
        init_distributed(require_group=True)
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
        self.ds_config = build_ds_config(
            zero_stage=self.zero_stage,
            micro_batch_size=self.micro_batch_size,
            grad_accum=self.grad_accum,
            world_size=get_world_size(),
            grad_clip=self.grad_clip,
            precision=self.precision,
            offload=self.offload,
            overrides=self.ds_overrides,
            **self.zero_kwargs,
        )
        if self.ds_overrides:
            log.warning("DeepSpeed config overrides applied: %s", self.ds_overrides)
        validate_ds_config(self.ds_config)
        log.info("DeepSpeed config: %s", self.ds_config)
        self._student, self._teacher = student, teacher
        teacher.requires_grad_(False)
        broadcast_module(teacher)
        optimizer = torch.optim.AdamW([dict(g) for g in param_groups], betas=self.betas, eps=self.eps)
        self._engine, *_ = deepspeed.initialize(model=_EngineRoot(student), optimizer=optimizer, config=self.ds_config)
        for child in student.children():
            child.register_forward_pre_hook(self._open_micro_batch, prepend=True)

    def _open_micro_batch(self, *_: Any) -> None:
        if not self._micro_batch_open:
            self._micro_batch_open = True
            self.engine()

    @property
    def engine(self) -> Any:
        """The ``DeepSpeedEngine`` that wraps the student; raises ``RuntimeError`` before ``setup``."""
        if self._engine is None:
            raise RuntimeError("call setup() first")
        return self._engine

    @property
    def optimizer(self) -> Any:
        """DeepSpeed's ZeRO optimizer; its ``param_groups`` are the client AdamW's, custom keys included."""
        return self.engine.optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The client AdamW's live ``param_groups``, as DeepSpeed's optimizer exposes them."""
        return self.engine.optimizer.param_groups

    # -- step --------------------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """``torch.autocast`` for bf16/fp16 on DeepSpeed's accelerator; no-op for fp32."""
        return autocast_context(self.precision, get_accelerator().device_name().split(":")[0])

    def backward(self, loss: torch.Tensor) -> None:
        """``engine.backward(loss)``; before the accumulation boundary also ``engine.step()``, which then only advances
        DeepSpeed's micro-batch counter.
        """
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        self._micro_batch_open = False
        if not boundary:
            self.engine.step()  # only advances DeepSpeed's micro-batch counter

    def clip_and_step(self, compute_norms: bool = True) -> dict[str, torch.Tensor]:
        """Per-sub-module clipping on the ranks' own gradient fragments, then DeepSpeed's step.

        Returns the pre-clip norm of each sub-module (0-dim tensors, the values the clip coefficients came from)
        when clipping is on or ``compute_norms`` is true, otherwise ``{}`` and no extra work is done.
        """
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError(f"clip_and_step() needs {self.grad_accum} backward() calls since the last step")
        norms: dict[str, torch.Tensor] = {}
        if self.grad_clip is not None or (compute_norms and self.module_grad_norms):
            fragments = local_grad_fragments(self.student, self.zero_stage)
            # fp16 gradients are loss-scaled
            norms = global_norms(fragments, float(getattr(self.optimizer, "loss_scale", 1.0) or 1.0))
            if self.grad_clip is not None:
                scale_fragments(fragments, norms, self.grad_clip, self.zero_stage)
        self.engine.step()
        return norms

    def zero_grad(self) -> None:
        """Clear the gradients through the engine."""
        self.engine.zero_grad()

    def update_teacher(self, momentum: float) -> None:
        """EMA ``t <- m t + (1 - m) s`` from full student tensors: the fp32 masters for fp16; under ZeRO-3
        gathered in buckets of ``ema_gather_numel`` elements.
        """
        teacher_params, student_params = paired_parameters(self.teacher, self.student)
        for teacher_bucket, student_full in self._full_student_tensors(teacher_params, student_params):
            ema_update_(teacher_bucket, student_full, momentum)

    def _full_student_tensors(
        self, teacher_params: list[nn.Parameter], student_params: list[nn.Parameter]
    ) -> Iterator[tuple[list[nn.Parameter], list[torch.Tensor]]]:
        """Yield (teacher params, full fp32-or-compute student tensors) in buckets valid only inside the loop."""
        if self.precision == "fp16":
            for t, s in zip(teacher_params, student_params, strict=False):
                master = safe_get_full_fp32_param(s) if s.requires_grad else None
                yield [t], [master if master is not None else _gather_one(s)]
            return
        if self.zero_stage < 3:
            yield teacher_params, list(student_params)
            return
        for start, stop in _numel_buckets([s.ds_numel for s in student_params], self.ema_gather_numel):
            chunk = student_params[start:stop]
            with deepspeed.zero.GatheredParameters(chunk, modifier_rank=None):
                yield teacher_params[start:stop], [s.data for s in chunk]

    # -- state -------------------------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Collective: the ZeRO shards under ``directory/deepspeed/state``, with the universal-checkpoint marker so that
        ``ds_to_universal`` can reshard them for another world size, plus ``teacher.pt`` from rank 0.
        """
        directory = Path(directory)
        self.engine.save_checkpoint(
            str(directory / DEEPSPEED_DIR),
            tag=DEEPSPEED_TAG,
            save_latest=False,
            client_state=universal_client_state(),
        )
        if get_rank() == 0:
            torch.save(cpu_state_dict(self.teacher), directory / TEACHER_FILE)

    def load(self, directory: Path, saved_world_size: int | None = None) -> None:
        """Load the ZeRO shards (converted to DeepSpeed's universal layout first when the world size changed)."""
        directory = Path(directory)
        ds_dir = directory / DEEPSPEED_DIR
        if not (ds_dir / DEEPSPEED_TAG).is_dir():
            single = (directory / STUDENT_FILE).is_file()
            raise DinoscopeError(
                "this checkpoint was written by the single-process strategy"
                if single
                else "the DeepSpeed shards of this checkpoint are missing",
                path=ds_dir,
                field="strategy",
                fix="resume with strategy 'single'" if single else "resume from a complete checkpoint directory",
            )
        resharding = saved_world_size is not None and int(saved_world_size) != get_world_size()
        if resharding != bool(self.zero_kwargs.get("load_universal")):
            raise DinoscopeError(
                f"the checkpoint was written at world size {saved_world_size}, this run has "
                f"{get_world_size()}, but the strategy was built with load_universal="
                f"{bool(self.zero_kwargs.get('load_universal'))}",
                path=directory,
                field="dist",
                fix="build the DeepSpeed strategy with load_universal=True exactly when the world "
                "size changes (core.train.loop does this)",
            )
        tag = DEEPSPEED_TAG
        if resharding:
            tag = UNIVERSAL_TAG
            if get_rank() == 0 and not (ds_dir / tag).is_dir():
                convert_to_universal(ds_dir)
            barrier()
            log.info(
                "resharding a checkpoint of world size %s to %d through %s",
                saved_world_size,
                get_world_size(),
                ds_dir / tag,
            )
        try:
            load_path, _ = self.engine.load_checkpoint(
                str(ds_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        except Exception as err:  # DeepSpeed raises ZeRORuntimeException, RuntimeError, AssertionError, KeyError...
            raise DinoscopeError(
                f"DeepSpeed cannot load this checkpoint ({type(err).__name__}: "
                f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})",
                path=ds_dir,
                field="dist",
                fix="resume with the model, dist.zero_stage and train.precision the "
                "checkpoint was written with; a different world size is handled automatically. "
                "Or start from its weights only: model.pretrained=<exported .safetensors>",
            ) from None
        if load_path is None:
            raise DinoscopeError("DeepSpeed found no checkpoint to load", path=ds_dir, field="dist")
        teacher_file = directory / TEACHER_FILE
        load_module_state(self.teacher, load_torch_file(teacher_file, "teacher"), teacher_file, "teacher")

    def full_teacher_state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copy of the teacher (never partitioned) on rank 0, ``{}`` elsewhere."""
        return cpu_state_dict(self.teacher) if get_rank() == 0 else {}

    def full_student_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: full fp32 student parameters (gathered under ZeRO-3) and buffers on rank 0, ``{}`` elsewhere."""
        named = list(self.student.named_parameters())
        params = [param for _, param in named]
        on_main = get_rank() == 0
        state: dict[str, torch.Tensor] = {}
        index = 0
        for _, tensors in self._full_student_tensors(params, params):
            for tensor in tensors:
                if on_main:
                    state[named[index][0]] = tensor.detach().to("cpu", dtype=torch.float32, copy=True)
                index += 1
        if not on_main:
            return {}
        state.update((k, v.detach().to("cpu", copy=True)) for k, v in self.student.named_buffers())
        return {k: state[k] for k in self.student.state_dict() if k in state}


def _gather_one(param: nn.Parameter) -> torch.Tensor:
    if hasattr(param, "ds_id"):
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.data.detach().clone()
    return param.data


def _numel_buckets(numels: Sequence[int], max_numel: int) -> Iterator[tuple[int, int]]:
    start, total = 0, 0
    for index, numel in enumerate(numels):
        if index > start and total + numel > max_numel:
            yield start, index
            start, total = index, 0
        total += numel
    if start < len(numels):
        yield start, len(numels)
