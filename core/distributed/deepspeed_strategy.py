"""DeepSpeed ZeRO 1/2/3 strategy. The only module of the project that imports ``deepspeed``.

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
  DeepSpeed's native fp16 mode with dynamic loss scaling (parameters stored in fp16, fp32 masters).
* **Clipping.** DINOv2 clips the backbone, the DINO head and the iBOT head separately (Oquab et al. 2023,
  facebookresearch/dinov2 ``train/train.py``), while DeepSpeed's ``gradient_clipping`` is one global norm, so it is
  kept at 0 and :meth:`clip_and_step` clips per sub-module itself: every rank sums the squares of the gradient
  fragments it owns (ZeRO-1/2: its slice of the flat partition, through the tensor-fragment mapping DeepSpeed keeps
  for each parameter; ZeRO-3: ``safe_get_local_grad``), one all-reduce of a vector with one entry per sub-module
  gives the norms, and each rank scales its own fragments by ``min(1, clip / (norm + 1e-6))`` before the optimizer
  step (the same coefficient as ``torch.nn.utils.clip_grad_norm_``). No parameter is ever gathered for this.
* **Resharding.** A checkpoint written at another world size is converted once with DeepSpeed's universal
  checkpoint tool (``deepspeed.checkpoint.ds_to_universal``; Lian et al. 2024, arXiv:2406.18820) into
  ``deepspeed/state_universal`` beside the original shards and loaded with ``checkpoint.load_universal``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)
from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_grad, safe_set_local_grad
from torch import nn

from core.distributed.device import module_device
from core.distributed.ema import ema_update_, paired_parameters
from core.distributed.env import barrier, get_rank, get_world_size, init_distributed
from core.distributed.strategy import (
    DEEPSPEED_DIR,
    DEEPSPEED_TAG,
    STUDENT_FILE,
    TEACHER_FILE,
    ModelsAfterSetup,
    Precision,
    autocast_context,
    broadcast_module,
    check_grad_clip,
    check_precision,
    clip_coefficients,
    cpu_state_dict,
    load_module_state,
    load_torch_file,
    submodule_parameters,
)
from core.errors import DinoscopeError
from core.io import atomic_path

log = logging.getLogger(__name__)

ZERO_STAGES = (1, 2, 3)
_ROOT_PREFIX = "student."
UNIVERSAL_TAG = f"{DEEPSPEED_TAG}_universal"


def build_ds_config(
    *,
    zero_stage: int,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float | None,
    precision: str,
    offload: bool = False,
    reduce_bucket_size: int = 50_000_000,
    allgather_bucket_size: int = 50_000_000,
    overlap_comm: bool | None = None,
    contiguous_gradients: bool = True,
    stage3_prefetch_bucket_size: int = 50_000_000,
    stage3_param_persistence_threshold: int = 100_000,
    stage3_max_live_parameters: int = 1_000_000_000,
    stage3_max_reuse_distance: int = 1_000_000_000,
    load_universal: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The DeepSpeed JSON config for typed arguments; rare keys go through ``overrides`` (deep-merged).

    Raises:
        DinoscopeError: for a stage outside 1-3, a non-positive batch or accumulation, or an unknown precision.
    """
    if zero_stage not in ZERO_STAGES:
        raise DinoscopeError(
            f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage}",
            field="dist.zero_stage",
            fix="use 1 or 2 (recommended) or 3 to also partition the parameters",
        )
    for field, value in (
        ("micro_batch_size", micro_batch_size),
        ("grad_accum", grad_accum),
        ("world_size", world_size),
    ):
        if int(value) < 1:
            raise DinoscopeError(f"{field} must be >= 1, got {value}", field=f"dist.{field}")
    check_precision(precision)
    check_grad_clip(grad_clip)
    zero: dict[str, Any] = {
        "stage": zero_stage,
        "contiguous_gradients": contiguous_gradients,
        "reduce_bucket_size": int(reduce_bucket_size),
        "overlap_comm": zero_stage == 3 if overlap_comm is None else overlap_comm,
    }
    if zero_stage < 3:
        zero["allgather_bucket_size"] = int(allgather_bucket_size)
    else:
        zero.update(
            stage3_prefetch_bucket_size=int(stage3_prefetch_bucket_size),
            stage3_param_persistence_threshold=int(stage3_param_persistence_threshold),
            stage3_max_live_parameters=int(stage3_max_live_parameters),
            stage3_max_reuse_distance=int(stage3_max_reuse_distance),
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(grad_accum),
        "train_batch_size": int(micro_batch_size) * int(grad_accum) * int(world_size),
        # Clipping is per sub-module (DeepSpeedStrategy.clip_and_step), never DeepSpeed's single global norm.
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    if precision == "bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return _deep_merge(config, overrides or {})


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def validate_ds_config(config: Mapping[str, Any]) -> None:
    """Run DeepSpeed's own config parser offline; its errors become a :class:`DinoscopeError`."""
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(dict(config))
    except Exception as err:  # DeepSpeed raises AssertionError, pydantic ValidationError, ValueError...
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DinoscopeError(
            f"DeepSpeed rejects the generated config: {first_line}",
            field="dist.deepspeed_overrides",
            fix="check dist.zero_stage, batch sizes and any dist.deepspeed_overrides keys",
        ) from None


def skip_shm_comm_op() -> None:
    """Stop DeepSpeed's CPU accelerator JIT-building its shared-memory all-reduce op (35-50 s, inference only).

    ``importlib`` is needed because ``deepspeed.comm`` re-exports ``torch`` under the name ``torch``.
    """
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


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
        self.betas = self.betas if betas is None else (float(betas[0]), float(betas[1]))
        self.eps = self.eps if eps is None else float(eps)
        self.precision = check_precision(precision)
        self.grad_clip = check_grad_clip(grad_clip)
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
        if self._engine is None:
            raise RuntimeError("call setup() first")
        return self._engine

    @property
    def optimizer(self) -> Any:
        """DeepSpeed's ZeRO optimizer; its ``param_groups`` are the client AdamW's, custom keys included."""
        return self.engine.optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.engine.optimizer.param_groups

    # -- step --------------------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return autocast_context(self.precision, get_accelerator().device_name().split(":")[0])

    def backward(self, loss: torch.Tensor) -> None:
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
            fragments = self._local_grad_fragments()
            norms = self._global_norms(fragments)
            if self.grad_clip is not None:
                self._scale_fragments(fragments, norms)
        self.engine.step()
        return norms

    def _local_grad_fragments(self) -> dict[str, list[tuple[nn.Parameter, torch.Tensor]]]:
        """This rank's slice of every student gradient, per sub-module (valid between backward and step)."""
        fragments: dict[str, list[tuple[nn.Parameter, torch.Tensor]]] = {}
        for name, params in submodule_parameters(self.student).items():
            owned = []
            for param in params:
                if self.zero_stage == 3:
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

    def _global_norms(self, fragments: dict[str, list[tuple[nn.Parameter, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        """L2 norm of each sub-module's full gradient: local norms, one all-reduce of their squares, fp16 unscaled.

        The local norm uses the same ``get_total_norm`` as the single-process strategy, so at world size 1 (where
        a rank's fragments are the whole gradients) both strategies clip with bit-identical coefficients.
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
        scale = float(getattr(self.engine.optimizer, "loss_scale", 1.0) or 1.0)  # fp16 gradients are loss-scaled
        totals = local / scale if scale != 1.0 else local
        return {name: totals[index] for index, name in enumerate(fragments)}

    def _scale_fragments(
        self, fragments: dict[str, list[tuple[nn.Parameter, torch.Tensor]]], norms: dict[str, torch.Tensor]
    ) -> None:
        assert self.grad_clip is not None
        for name, owned in fragments.items():
            coefficient = clip_coefficients(norms[name], self.grad_clip)
            if not torch.isfinite(norms[name]):
                continue  # an overflowing fp16 step is skipped by DeepSpeed's loss scaler anyway
            for param, grad in owned:
                if self.zero_stage == 3:
                    safe_set_local_grad(param, grad * coefficient.to(grad.device, grad.dtype))
                else:
                    grad.mul_(coefficient.to(grad.device, grad.dtype))

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def update_teacher(self, momentum: float) -> None:
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
        directory = Path(directory)
        # The universal-checkpoint marker lets ds_to_universal reshard these shards for another world size later.
        self.engine.save_checkpoint(
            str(directory / DEEPSPEED_DIR),
            tag=DEEPSPEED_TAG,
            save_latest=False,
            client_state={
                UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
            },
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
        return cpu_state_dict(self.teacher) if get_rank() == 0 else {}

    def full_student_state_dict(self) -> dict[str, torch.Tensor]:
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


def consolidate_zero_checkpoint(ds_dir: Path, tag: str = DEEPSPEED_TAG) -> dict[str, torch.Tensor]:
    """Full fp32 student state dict merged from the ZeRO shards of a checkpoint (DeepSpeed's zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
        raise DinoscopeError(
            f"cannot merge the ZeRO shards ({type(err).__name__}: {err})",
            path=ds_dir,
            fix="pass a complete DeepSpeed checkpoint directory",
        ) from None
    return {k[len(_ROOT_PREFIX) :] if k.startswith(_ROOT_PREFIX) else k: v for k, v in state.items()}


def convert_to_universal(ds_dir: Path, tag: str = DEEPSPEED_TAG) -> Path:
    """Convert ``ds_dir/tag`` (ZeRO shards of any world size) into ``ds_dir/<tag>_universal``, atomically.

    DeepSpeed's own converter (``deepspeed.checkpoint.ds_to_universal``) writes one folder per parameter holding
    its fp32 value and AdamW moments, which any data-parallel degree can load (arXiv:2406.18820).
    """
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    final = Path(ds_dir) / f"{tag}_universal"
    with atomic_path(final, is_dir=True) as tmp:
        args = argparse.Namespace(
            input_folder=str(Path(ds_dir) / tag),
            output_folder=str(tmp),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=False,
        )
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its progress
                ds_to_universal.main(args)
        except Exception as err:
            raise DinoscopeError(
                f"DeepSpeed cannot convert this checkpoint to the universal layout ({type(err).__name__}: {err})",
                path=Path(ds_dir) / tag,
                field="dist",
                fix="resume at the world size the checkpoint was written with",
            ) from None
    return final


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
