"""Model FLOPs of one DINOv2 SSL training step per image, and the model FLOP utilisation (MFU) of a dinoscope run.

Counting convention (the standard dense-transformer count): a multiply-add is 2 FLOPs, so a ``[rows, a] @ [a, b]``
product costs ``2 * rows * a * b``; only matrix products are counted (LayerNorm, GELU, softmax, residual adds and
the losses are left out); the backward pass costs twice the forward (gradients with respect to the activations and
to the weights), so a trained module costs 3x its forward. References: Kaplan et al. 2020, "Scaling Laws for Neural
Language Models" (arXiv:2001.08361, section 2.1: forward ``2N + 2 n_layer n_ctx d_attn`` per token, backward twice
that) and Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM"
(arXiv:2104.04473, appendix: ``24 B s h^2 + 4 B s^2 h`` forward FLOPs per layer, without recomputation). For a ViT
block over ``T`` tokens of width ``D`` with MLP hidden size ``H``:

    qkv 2T*D*3D + proj 2T*D*D + MLP 2 * 2T*D*H + attention scores 2T*T*D + attention-weighted values 2T*T*D

which is ``24 T D^2 + 4 T^2 D`` for ``H = 4D``. The patch embedding is a linear map of ``C p^2`` pixels per patch.

A DINOv2 step per image (Oquab et al. 2023, arXiv:2304.07193):

* student backbone, forward + backward (3x): the 2 global crops and the local crops;
* teacher backbone, forward only (1x, evaluation mode, no stochastic depth): the 2 global crops;
* stochastic depth: DINOv2's "efficient" implementation (``core.models.block.add_residual_on_subset``, used for
  drop rates above 0.1) computes each residual branch only for the kept samples, ``max(int(B (1 - r)), 1)`` of ``B``,
  so the student's transformer blocks cost that fraction (``1 - r`` without a batch size). At rates of 0.1 or less
  the model multiplies a mask instead and computes every branch, so nothing is skipped. The patch embedding, the
  teacher and the heads are never dropped;
* DINO/iBOT heads (included unless ``heads=False``): student (3x) on the class tokens of every crop and on the
  masked global-crop patches, teacher (1x) on the 2 global class tokens and the same masked patches. The masked
  patches per image are what the collate requests on average, ``2 * mask_probability * mean(mask_ratio) * N``
  (block masking can fall slightly short of a request, so this is a hair high; the heads are ~1% of the total).

    python bench/flops.py RUN_DIR --strategy single --warmup 10   # one JSON line: images/s, MFU, memory
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

# Dense bf16 peak of an H100/H200 SXM (NVIDIA datasheet, without sparsity), in TFLOP/s.
DEFAULT_PEAK_TFLOPS = 989.0


def block_forward_flops(dim: int, tokens: int, mlp_hidden: int) -> int:
    """Forward FLOPs of one pre-norm transformer block over ``tokens`` tokens of one image."""
    t = tokens
    matmuls = 2 * t * dim * (3 * dim) + 2 * t * dim * dim + 2 * 2 * t * dim * mlp_hidden
    attention = 2 * 2 * t * t * dim  # Q K^T and softmax(.) V
    return matmuls + attention


def patch_embed_flops(dim: int, n_patches: int, patch_size: int, in_chans: int) -> int:
    return 2 * n_patches * in_chans * patch_size * patch_size * dim


def head_forward_flops(in_dim: int, hidden_dim: int, bottleneck_dim: int, n_prototypes: int, nlayers: int = 3) -> int:
    """Forward FLOPs of a DINO head (MLP, then the weight-normalised prototype layer) on one token."""
    if nlayers <= 1:
        mlp = in_dim * bottleneck_dim
    else:
        mlp = in_dim * hidden_dim + (nlayers - 2) * hidden_dim * hidden_dim + hidden_dim * bottleneck_dim
    return 2 * (mlp + bottleneck_dim * n_prototypes)


def kept_fraction(rate: float, rows: int | None = None) -> float:
    """Share of the samples whose residual branch a block computes in training (see the module docstring)."""
    if rate <= 0.1:  # the model's threshold between mask-multiply drop path and the efficient subset variant
        return 1.0
    if rows is None:
        return 1.0 - rate
    return max(int(rows * (1.0 - rate)), 1) / rows


def block_rates(drop_path_rate: float, depth: int, uniform: bool = True) -> list[float]:
    """Per-block drop rates as ``core.models.vit`` assigns them (uniform, or linear from 0)."""
    if uniform or depth == 1:
        return [drop_path_rate] * depth
    return [drop_path_rate * i / (depth - 1) for i in range(depth)]


def ssl_step_flops_per_image(
    *,
    dim: int,
    depth: int,
    patch_size: int,
    global_size: int,
    local_size: int,
    n_local: int,
    drop_path_rate: float,
    drop_path_uniform: bool = True,
    mlp_ratio: float = 4.0,
    in_chans: int = 3,
    registers: int = 0,
    batch: int | None = None,
    heads: bool = True,
    dino_head: tuple[int, int, int, int] = (2048, 256, 65536, 3),
    ibot_head: tuple[int, int, int, int] | None = None,
    mask_probability: float = 0.5,
    mask_ratio: tuple[float, float] = (0.1, 0.5),
) -> dict[str, float]:
    """FLOPs per image of one training step, by part, and their ``total``.

    ``batch`` (images per rank) makes the stochastic-depth fraction exact (the kept count is rounded down per set:
    ``2 * batch`` global crops, ``n_local * batch`` local crops); without it the nominal ``1 - rate`` is used.
    Heads are ``(hidden_dim, bottleneck_dim, n_prototypes, nlayers)``; ``ibot_head`` is a separate iBOT head, or
    ``None`` when iBOT shares the DINO head.
    """
    hidden = int(dim * mlp_ratio)
    n_global = (global_size // patch_size) ** 2
    n_loc = (local_size // patch_size) ** 2
    rates = block_rates(drop_path_rate, depth, drop_path_uniform)
    g_rows = None if batch is None else 2 * batch
    l_rows = None if batch is None else n_local * batch

    def blocks(tokens: int, rows: int | None, dropped: bool) -> float:
        per_block = block_forward_flops(dim, tokens + 1 + registers, hidden)
        return sum(per_block * (kept_fraction(r, rows) if dropped else 1.0) for r in rates)

    embed_g = patch_embed_flops(dim, n_global, patch_size, in_chans)
    embed_l = patch_embed_flops(dim, n_loc, patch_size, in_chans)
    parts: dict[str, float] = {
        "student_blocks": 3 * (2 * blocks(n_global, g_rows, True) + n_local * blocks(n_loc, l_rows, True)),
        "student_patch_embed": 3 * (2 * embed_g + n_local * embed_l),
        "teacher_blocks": 2 * blocks(n_global, None, False),
        "teacher_patch_embed": 2 * embed_g,
    }
    if heads:
        dino = head_forward_flops(dim, *dino_head)
        ibot = dino if ibot_head is None else head_forward_flops(dim, *ibot_head)
        masked = 2 * mask_probability * (mask_ratio[0] + mask_ratio[1]) / 2 * n_global
        parts["student_heads"] = 3 * ((2 + n_local) * dino + masked * ibot)
        parts["teacher_heads"] = 2 * dino + masked * ibot
    parts["total"] = sum(parts.values())
    return parts


def mfu(
    images_per_s: float, flops_per_image: float, peak_tflops: float = DEFAULT_PEAK_TFLOPS, n_devices: int = 1
) -> float:
    """Achieved model FLOP/s over the devices' peak."""
    return images_per_s * flops_per_image / (peak_tflops * 1e12 * n_devices)


def recipe_flops_per_image(config: dict[str, Any], *, heads: bool = True) -> dict[str, float]:
    """:func:`ssl_step_flops_per_image` for a resolved recipe (a run's ``config.yaml`` as a dict)."""
    m, c, t = config["model"], config["crops"], config["train"]
    if m["arch"] == "custom":
        dim, depth = int(m["embed_dim"]), int(m["depth"])
    else:
        from core.models.factories import ARCH_SIZES  # deferred: imports torch

        dim, depth, _ = ARCH_SIZES[m["arch"]]

    def head(cfg: dict[str, Any]) -> tuple[int, int, int, int]:
        return (int(cfg["hidden_dim"]), int(cfg["bottleneck_dim"]), int(cfg["n_prototypes"]), int(cfg["nlayers"]))

    ibot = config["ibot"]
    return ssl_step_flops_per_image(
        dim=dim,
        depth=depth,
        patch_size=int(m["patch_size"]),
        global_size=int(c["global_crops_size"]),
        local_size=int(c["local_crops_size"]),
        n_local=int(c["local_crops_number"]),
        drop_path_rate=float(m["drop_path_rate"]),
        drop_path_uniform=bool(m.get("drop_path_uniform", True)),
        in_chans=int(m.get("in_chans", 3)),
        registers=int(m.get("num_register_tokens", 0)),
        batch=int(t["batch_size_per_rank"]),
        heads=heads,
        dino_head=head(config["dino"]["head"]),
        ibot_head=head(ibot["head"]) if ibot.get("separate_head") else None,
        mask_probability=float(ibot["mask_sample_probability"]),
        mask_ratio=(float(ibot["mask_ratio_min_max"][0]), float(ibot["mask_ratio_min_max"][1])),
    )


def summarize_run(
    run_dir: str | Path, *, warmup: int = 10, peak_tflops: float = DEFAULT_PEAK_TFLOPS, heads: bool = True
) -> dict[str, Any]:
    """Throughput, MFU and peak memory of a run directory's ``metrics.jsonl`` (one row per logged iteration).

    images/s is the median of the per-row rates after the first ``warmup`` rows (all rows if there are no more);
    the rates are per job, so the MFU divides by the run's world size. Raises ``FileNotFoundError`` without
    metrics, ``ValueError`` with an empty file.
    """
    import yaml

    run = Path(run_dir)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = yaml.safe_load((run / "config.yaml").read_text())
    info_path = run / "run_info.json"
    world = int(json.loads(info_path.read_text()).get("world_size", 1)) if info_path.exists() else 1
    if not rows:
        raise ValueError("metrics.jsonl has no rows")
    measured = rows[warmup:] or rows
    ips = statistics.median(float(r["images_per_s"]) for r in measured)
    flops = recipe_flops_per_image(config, heads=heads)
    return {
        "images_per_s": round(ips, 2),
        "mfu": _sig(mfu(ips, flops["total"], peak_tflops, world)),
        "gflops_per_image": _sig(flops["total"] / 1e9),
        "heads_counted": heads,
        "peak_tflops": peak_tflops,
        "world_size": world,
        "max_memory_mb": round(max(float(r["max_memory_mb"]) for r in rows), 1),
        "iterations": int(rows[-1]["iteration"]),
        "measured_iterations": len(measured),
        "final_loss": rows[-1].get("loss/total"),
    }


def ssl_step_bench_mfu(images_per_s: float, step_args: list[str], peak_tflops: float = DEFAULT_PEAK_TFLOPS) -> float:
    """MFU of a ``bench/ssl_step.py`` result with this module's count, from the arguments that bench ran with.

    That bench keeps its own, simpler count (full student, no heads); this one makes its figure comparable with the
    trainer's. The defaults and fixed settings (drop path 0.4, default heads) are those of ``bench/ssl_step.py``.
    """
    p = argparse.ArgumentParser(add_help=False)
    for name, default in (
        ("arch", "vit_large"),
        ("patch", 14),
        ("batch", 32),
        ("global-size", 224),
        ("local-size", 98),
        ("locals", 8),
        ("prototypes", 65536),
    ):
        p.add_argument("--" + name, type=type(default), default=default)
    a, _ = p.parse_known_args(step_args)
    from core.models.factories import ARCH_SIZES  # deferred: imports torch

    dim, depth, _ = ARCH_SIZES[a.arch]
    f = ssl_step_flops_per_image(
        dim=dim,
        depth=depth,
        patch_size=a.patch,
        global_size=a.global_size,
        local_size=a.local_size,
        n_local=a.locals,
        drop_path_rate=0.4,
        batch=a.batch,
        dino_head=(2048, 256, a.prototypes, 3),
    )
    return _sig(mfu(images_per_s, f["total"], peak_tflops))


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits: MFU and GFLOPs stay readable from a CPU smoke run to an H200."""
    return float(f"{x:.{digits}g}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Summarise a dinoscope pretraining run as one JSON line.")
    p.add_argument("run_dir")
    p.add_argument("--strategy", default="", help="label copied into the line")
    p.add_argument("--warmup", type=int, default=10, help="logged iterations left out of the median")
    p.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS)
    p.add_argument("--no-heads", action="store_true", help="count the backbones only")
    p.add_argument("--exit-status", type=int, default=0, help="the run's exit status, copied into the line")
    p.add_argument("--wall-s", type=float, default=None, help="the run's wall time, copied into the line")
    args = p.parse_args(argv)
    line: dict[str, Any] = {"strategy": args.strategy}
    try:
        line.update(
            summarize_run(args.run_dir, warmup=args.warmup, peak_tflops=args.peak_tflops, heads=not args.no_heads)
        )
    except (OSError, ValueError, KeyError) as err:  # a failed run may leave no or partial metrics
        line["error"] = f"no usable metrics in {args.run_dir}: {err}"
    line.update(wall_s=None if args.wall_s is None else round(args.wall_s, 1), exit_status=args.exit_status)
    print(json.dumps(line))
    return 0 if "error" not in line else 1


if __name__ == "__main__":
    raise SystemExit(main())
