"""Per-rank memory and communication of ZeRO-1, -2 and -3 for a pretraining recipe, from its real parameter counts.

    python bench/zero_arithmetic.py                               # JSON: the ViT-g/14 cluster recipe on 128 ranks
    python bench/zero_arithmetic.py --markdown                    # the table of recipes/README.md
    python bench/zero_arithmetic.py --world-size 64 dist.stage3_max_reuse_distance=2000000000

The student (backbone + DINO head + iBOT head) is built with the project's own builders under ``torch.device("meta")``,
so nothing is allocated, and one student forward on meta tensors of the recipe's crop shapes records the order in
which modules use their parameters. The arithmetic follows what ``core/distributed/deepspeed_strategy.py`` asks
DeepSpeed (0.19) to do, bf16 meaning DeepSpeed's ``torch_autocast`` mode:

* memory: fp32 parameters (full for ZeRO-1/2, 1/N for ZeRO-3 except parameters below
  ``stage3_param_persistence_threshold``, kept whole), DeepSpeed's fp32 master partition (ZeRO-1/2 clone the
  partition; ZeRO-3 updates its fp32 partition in place), fp32 gradients (full for ZeRO-1, 1/N for 2/3), AdamW's two
  fp32 states (1/N), and the EMA teacher: a full fp32 copy of backbone + heads on every rank (it never enters
  DeepSpeed). Communication buffers follow the recipe's ``dist`` bucket sizes.
* communication per optimizer step, in elements (units of the student's parameter count Psi) and bytes: ZeRO-1/2
  reduce-scatter the gradients and all-gather the updated fp32 parameters; ZeRO-3 all-gathers parameters for their
  uses in forward and backward, reduce-scatters the gradients, and gathers the whole student once more for the EMA
  teacher update (``GatheredParameters``, fp32, ``ema_gather_numel`` elements at a time). Under ZeRO-1/2 the EMA reads
  the local full parameters: no communication. Gradients and forward/backward gathers of Linear/Conv parameters
  travel in bf16 (DeepSpeed's ``comm_dtype`` for autocast-safe modules), everything else in fp32. ``wire`` bytes are
  what one rank sends in a ring collective: (N - 1) / N of the buffer.
* how often ZeRO-3 gathers a parameter, and how many it holds gathered at once, depend on DeepSpeed's prefetching and
  release rules (``stage3_*`` keys), so :func:`simulate_zero3_gathers` replays them on the recorded module order. On a
  2-process CPU toy (a backbone of 8 Linear layers called twice per step, then a head) the replay gave DeepSpeed
  0.19.8's own count for every reuse distance and prefetch bucket tried; without prefetching DeepSpeed gathers one
  layer less in backward (the first layer's input needs no gradient, so its post-backward release never fires).

Activations are not modelled: they depend on the batch, not on the ZeRO stage, and come on top of every figure here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = ROOT / "recipes" / "cluster" / "pretrain_vitg14_16nodes.yaml"
GIB = 2**30
_ROOT = "<engine root>"  # core.distributed.deepspeed_strategy._EngineRoot, which owns the student
# DeepSpeed's torch_autocast gives parameters of exactly these classes a bf16 comm dtype (LOWER_PRECISION_SAFE_MODULES).
_BF16_COMM_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def build_student(recipe: Any) -> nn.Module:
    """The recipe's student (backbone, dino_head, ibot_head) on the meta device: shapes only, no storage."""
    from core.ssl.build import build_meta_arch

    with torch.device("meta"):
        return build_meta_arch(recipe)


def trace_student(meta_arch: nn.Module, recipe: Any) -> tuple[list[tuple[str, str]], Counter]:
    """``("pre"|"post", module name)`` for every student module, in the order one student forward at the recipe's crop
    shapes enters and leaves them (what DeepSpeed's ZeRO-3 hooks see: modules without parameters of their own count
    too, as each step of the trace may prefetch), and the number of calls of each top-level student module."""
    events: list[tuple[str, str]] = []
    calls: Counter = Counter({name: 0 for name in meta_arch.student})
    handles = [
        meta_arch.student[name].register_forward_pre_hook(lambda *_, n=name: calls.update([n]))
        for name in meta_arch.student
    ]
    for name, module in meta_arch.student.named_modules():
        if name:  # the ModuleDict itself is never called
            handles.append(module.register_forward_pre_hook(lambda *_, n=name: events.append(("pre", n))))
            handles.append(module.register_forward_hook(lambda *_, n=name: events.append(("post", n))))
    b, crops, p = recipe.train.batch_size_per_rank, recipe.crops, recipe.model.patch_size
    g, loc, chans = crops.global_crops_size, crops.local_crops_size, recipe.model.in_chans
    n_patches = (g // p) ** 2
    with torch.device("meta"):
        batch = {
            "collated_global_crops": torch.empty(2 * b, chans, g, g),
            "collated_local_crops": torch.empty(crops.local_crops_number * b, chans, loc, loc),
            "collated_masks": torch.zeros(2 * b, n_patches, dtype=torch.bool),
            "mask_indices_list": torch.zeros(b * n_patches // 4, dtype=torch.long),
        }  # any count will do
    meta_arch.student.train()
    meta_arch.student_output(batch)
    for handle in handles:
        handle.remove()
    return events, calls


def _mirror(events: list[tuple[str, str]]) -> list[tuple[str, str]]:
    # Autograd visits the modules in exactly the reverse forward order here (checked with backward hooks on meta
    # tensors); a module's backward starts where its forward ended.
    return [("post" if kind == "pre" else "pre", name) for kind, name in reversed(events)]


def simulate_zero3_gathers(
    events: list[tuple[str, str]],
    params: dict[str, list[nn.Parameter]],
    *,
    max_reuse_distance: int,
    persistence_threshold: int,
    prefetch_bucket_size: int,
    max_live_parameters: int,
    backward: list[tuple[str, str]] | None = None,
) -> tuple[dict[str, Counter], int]:
    """How often each parameter is all-gathered in forward and backward of one micro-batch under ZeRO-3.

    Replays DeepSpeed's ``PartitionedParameterCoordinator`` on the recorded module order (forward, then the mirrored
    backward unless ``backward`` is given): entering a module gathers its parameters that are not held, then
    prefetches parameters of the next modules up to ``prefetch_bucket_size`` elements (while fewer than
    ``max_live_parameters`` are held; parameters already held are looked past for free); leaving it
    releases its parameters unless the prefetcher already looked past their next use, or they are used again within
    ``max_reuse_distance`` elements of parameters fetched next. Parameters of at most ``persistence_threshold``
    elements stay whole and are never gathered. Returns the gather counts by phase and parameter id, and the most
    elements held gathered at once.
    """
    backward = _mirror(events) if backward is None else backward
    step_events = [
        (phase, kind, name) for phase, evs in (("forward", events), ("backward", backward)) for kind, name in evs
    ]
    order = [name for _, kind, name in step_events if kind == "pre"]  # DeepSpeed's module trace of one step
    queue = deque((q, step) for step, name in enumerate(order) for q in params[name])  # its parameter trace
    persistent = {id(q) for qs in params.values() for q in qs if q.numel() <= persistence_threshold}
    gathers: dict[str, Counter] = {"forward": Counter(), "backward": Counter()}
    most_recent: dict[int, int] = defaultdict(lambda: -(10**12))  # last trace step the prefetcher looked past
    held: dict[int, int] = {}  # gathered parameter id -> elements
    step = peak = 0

    def gather(qs: list[nn.Parameter], phase: str) -> None:
        nonlocal peak
        for q in qs:
            if id(q) not in held and id(q) not in persistent:
                held[id(q)] = q.numel()
                gathers[phase][id(q)] += 1
        peak = max(peak, sum(held.values()))

    for phase, kind, name in step_events:
        own = params[name]
        if kind == "post":
            release = {id(q) for q in own if id(q) in held and most_recent[id(q)] <= step}
            traversed = 0
            for later in order[step:]:
                if traversed >= max_reuse_distance or not release:
                    break
                for q in params[later]:
                    release.discard(id(q))
                    traversed += q.numel()
            for key in release:
                del held[key]
            continue
        gather(own, phase)
        pending = {id(q) for q in own if most_recent[id(q)] < step}
        popped: set[int] = set()
        while queue and len(popped) < len(pending):  # this module's own entries leave the prefetch queue
            q, used_at = queue.popleft()
            most_recent[id(q)] = used_at
            popped.add(id(q))
        budget, chosen = min(max_live_parameters - sum(held.values()), prefetch_bucket_size), {}
        while prefetch_bucket_size > 0 and queue and sum(c.numel() for c in chosen.values()) < budget:
            q, used_at = queue.popleft()
            most_recent[id(q)] = max(most_recent[id(q)], used_at)
            if id(q) not in held and id(q) not in persistent:
                chosen[id(q)] = q
        gather(list(chosen.values()), phase)
        step += 1
    return gathers, peak


def _bytes_per_element(module: nn.Module, precision: str) -> int:
    return 2 if precision == "bf16" and type(module) in _BF16_COMM_MODULES else 4


def _comm(elements: float, nbytes: float, psi: int, world: int) -> dict[str, float]:
    return {
        "psi": round(elements / psi, 3),
        "elements": int(elements),
        "bytes": int(nbytes),
        "wire_bytes_per_rank": int(nbytes * (world - 1) / world),
    }


def _mean(weights: dict[int, int], values: Counter) -> float:
    total = sum(weights.values())
    return round(sum(values[i] * n for i, n in weights.items()) / total, 3) if total else 0.0


def arithmetic(recipe: Any, world: int) -> dict[str, Any]:
    """Parameter counts, ZeRO-3 gather counts and the per-stage memory and communication of one rank."""
    from core.errors import DinoscopeError

    precision, d, accum = recipe.train.precision, recipe.dist, recipe.dist.grad_accum
    if precision not in ("bf16", "fp32"):
        raise DinoscopeError(
            f"the arithmetic covers bf16 autocast and fp32, not {precision!r}",
            field="train.precision",
            fix="train.precision=bf16 (DeepSpeed torch_autocast)",
        )
    meta_arch = build_student(recipe)
    events, calls = trace_student(meta_arch, recipe)
    owners = dict(meta_arch.student.named_modules())
    params = {name: list(module.parameters(recurse=False)) for name, module in owners.items()}
    numel = {id(q): q.numel() for qs in params.values() for q in qs}
    comm_bytes = {id(q): _bytes_per_element(owners[name], precision) for name, qs in params.items() for q in qs}
    group_of = {id(q): name.split(".", 1)[0] for name, qs in params.items() for q in qs}
    groups = {g: sum(n for i, n in numel.items() if group_of[i] == g) for g in meta_arch.student}
    psi = sum(groups.values())
    teacher = sum(q.numel() for q in meta_arch.teacher.parameters())
    persistent = sum(n for n in numel.values() if n <= d.stage3_param_persistence_threshold)
    sharded = {
        g: {i: n for i, n in numel.items() if group_of[i] == g and n > d.stage3_param_persistence_threshold}
        for g in groups
    }
    # The engine's root module is called first in each micro-batch (a trace step that prefetches) and has no backward.
    params[_ROOT] = []
    gathers, peak_live = simulate_zero3_gathers(
        [("pre", _ROOT), ("post", _ROOT), *events],
        params,
        backward=_mirror(events),
        max_reuse_distance=d.stage3_max_reuse_distance,
        persistence_threshold=d.stage3_param_persistence_threshold,
        prefetch_bucket_size=d.stage3_prefetch_bucket_size,
        max_live_parameters=d.stage3_max_live_parameters,
    )
    grad_bytes = sum(comm_bytes[i] * n for i, n in numel.items())
    comm_dtype_bytes = set(comm_bytes.values())  # one gradient bucket per comm dtype

    def shard(n: int) -> int:
        return math.ceil(n / world)

    stages: dict[str, Any] = {}
    for stage in (1, 2, 3):
        overlap = stage == 3 if d.overlap_comm is None else d.overlap_comm
        # ZeRO-1/2 stage gradients in fp32 buckets of reduce_bucket_size, one per comm dtype, doubled to overlap;
        # ZeRO-3 keeps one bucket per comm dtype, in that dtype.
        reduce_buffer = (
            d.reduce_bucket_size * sum(comm_dtype_bytes)
            if stage == 3
            else 4 * d.reduce_bucket_size * len(comm_dtype_bytes) * (2 if overlap else 1)
        )
        mem = {
            "student_params_fp32": 4 * (psi if stage < 3 else shard(psi) + persistent),
            "master_fp32": 4 * shard(psi) if stage < 3 else 0,
            "grads_fp32": 4 * (psi if stage == 1 else shard(psi)),
            "adamw_fp32": 8 * shard(psi),
        }
        mem["model_states"] = sum(mem.values())
        mem["teacher_fp32"] = 4 * teacher  # backbone + heads, full on every rank: it never enters DeepSpeed
        comm: dict[str, Any] = {}
        if stage < 3:
            reductions = 1 if stage == 1 else accum  # ZeRO-1 reduces at the step, ZeRO-2 after every micro-batch
            comm["reduce_scatter_grads"] = _comm(reductions * psi, reductions * grad_bytes, psi, world)
            comm["all_gather_params"] = _comm(psi, 4 * psi, psi, world)  # the updated fp32 parameters
            comm["ema_gather"] = {**_comm(0, 0, psi, world), "buckets": 0}
            per_group = {g: 1.0 for g in groups}
            mem["buffers"] = reduce_buffer
        else:
            for phase in ("forward", "backward"):
                counts = gathers[phase]
                comm[f"{phase}_gathers"] = _comm(
                    accum * sum(c * numel[i] for i, c in counts.items()),
                    accum * sum(c * numel[i] * comm_bytes[i] for i, c in counts.items()),
                    psi,
                    world,
                )
            comm["reduce_scatter_grads"] = _comm(accum * psi, accum * grad_bytes, psi, world)
            ema = psi - persistent
            comm["ema_gather"] = {**_comm(ema, 4 * ema, psi, world), "buckets": math.ceil(ema / d.ema_gather_numel)}
            per_group = {
                g: round(accum * (_mean(w, gathers["forward"]) + _mean(w, gathers["backward"])) + 1, 2)
                for g, w in sharded.items()
            }
            # Gathered parameters are cast back to fp32 after the bf16 transfer; the EMA bucket is gathered after the
            # step, when the forward/backward ones are released, so the larger of the two counts.
            mem["buffers"] = reduce_buffer + 4 * max(peak_live, d.ema_gather_numel)
        mem["total_without_activations"] = mem["model_states"] + mem["teacher_fp32"] + mem["buffers"]
        parts = list(comm.values())
        comm["total"] = _comm(sum(c["elements"] for c in parts), sum(c["bytes"] for c in parts), psi, world)
        stages[f"zero{stage}"] = {"memory_bytes": mem, "communication_per_step": comm, "gathers_per_step": per_group}
    b, crops, p = recipe.train.batch_size_per_rank, recipe.crops, recipe.model.patch_size
    tokens = b * (
        2 * ((crops.global_crops_size // p) ** 2 + 1)
        + crops.local_crops_number * ((crops.local_crops_size // p) ** 2 + 1)
    )
    return {
        "world_size": world,
        "precision": precision,
        "grad_accum": accum,
        "batch_size_per_rank": b,
        "params": {
            **groups,
            "student": psi,
            "teacher": teacher,
            "zero3_persistent": persistent,
            "bf16_comm": sum(n for i, n in numel.items() if comm_bytes[i] == 2),
        },
        "student_calls_per_micro_batch": dict(calls),
        "zero3_gathers_per_micro_batch": {g: {ph: _mean(w, gathers[ph]) for ph in gathers} for g, w in sharded.items()},
        "zero3_peak_gathered_elements": peak_live,
        "activations": {
            "tokens_per_rank": tokens,
            "note": f"not included: activations of {b} images x (2 x {crops.global_crops_size}^2 + "
            f"{crops.local_crops_number} x {crops.local_crops_size}^2 crops) = {tokens} "
            f"tokens per rank come on top of every figure, the same for every stage",
        },
        "stages": stages,
    }


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _psi(c: dict[str, Any]) -> str:
    return f"{c['psi']:.2f} Ψ = {_gib(c['bytes'])}" if c["elements"] else "0"


def markdown(result: dict[str, Any]) -> str:
    """The comparison table of recipes/README.md."""
    st, pr = result["stages"], result["params"]
    cols = ("zero1", "zero2", "zero3")

    def row(label: str, cell: Any) -> str:
        return f"| {label} | " + " | ".join(cell(st[c]) for c in cols) + " |"

    def gathers(s: dict[str, Any]) -> str:
        return " / ".join(f"{v:g}" for v in s["gathers_per_step"].values())

    mem = [
        ("student fp32 parameters", "student_params_fp32"),
        ("fp32 master partition", "master_fp32"),
        ("fp32 gradients", "grads_fp32"),
        ("AdamW states (2 x fp32)", "adamw_fp32"),
        ("**model states**", "model_states"),
        ("EMA teacher (full fp32, every rank)", "teacher_fp32"),
        ("gradient buckets + gathered parameters", "buffers"),
        ("**total before activations**", "total_without_activations"),
    ]
    heads = ", ".join(f"{k} {pr[k]:,}" for k in pr if k.endswith("_head"))
    calls = ", ".join(f"{k} {v}" for k, v in result["student_calls_per_micro_batch"].items())
    header = (
        f"Ψ = {pr['student']:,} student parameters (backbone {pr['backbone']:,}, {heads}); world size "
        f"{result['world_size']}, {result['precision']}, {result['batch_size_per_rank']} images per rank, "
        f"grad_accum {result['grad_accum']}. Student calls per micro-batch: {calls}."
    )
    lines = [textwrap.fill(header, 120), "", "| per rank | ZeRO-1 | ZeRO-2 | ZeRO-3 |", "|---|---|---|---|"]
    lines += [row(label, lambda s, k=key: _gib(s["memory_bytes"][k])) for label, key in mem]
    groups = " / ".join(k for k in pr if k == "backbone" or k.endswith("_head"))
    lines += [
        row(f"gathers per step ({groups})", gathers),
        row(
            "EMA gather per step",
            lambda s: (
                _psi(s["communication_per_step"]["ema_gather"])
                + (
                    f" in {s['communication_per_step']['ema_gather']['buckets']} buckets"
                    if s["communication_per_step"]["ema_gather"]["buckets"]
                    else ""
                )
            ),
        ),
        row("**communication per step**", lambda s: _psi(s["communication_per_step"]["total"])),
        row("sent per rank (ring)", lambda s: _gib(s["communication_per_step"]["total"]["wire_bytes_per_rank"])),
        "",
        textwrap.fill(f"Not included: {result['activations']['note'].split(': ', 1)[1]}.", 120),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="recipe key=value overrides (dist.stage3_max_reuse_distance=...)")
    p.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="pretraining recipe (default: the ViT-g/14 one)")
    p.add_argument("--world-size", type=int, default=128, help="ranks (default: 128 = 16 nodes x 8 GPUs)")
    p.add_argument("--markdown", action="store_true", help="print the README table instead of JSON")
    args = p.parse_args(argv)

    from core.config import load_recipe
    from core.config.pretrain import PretrainRecipe
    from core.errors import DinoscopeError

    try:
        if args.world_size < 1:
            raise DinoscopeError(f"--world-size must be at least 1, got {args.world_size}", field="--world-size")
        result = arithmetic(load_recipe(PretrainRecipe, args.recipe, args.overrides), args.world_size)
    except DinoscopeError as err:
        print(f"zero_arithmetic: error: {err}", file=sys.stderr)
        return 2
    shown = args.recipe.resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown  # same JSON on every checkout
    print(markdown(result) if args.markdown else json.dumps({"recipe": str(shown), **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
