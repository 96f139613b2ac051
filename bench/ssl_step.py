"""One DINOv2 SSL training step (teacher + student + DINO/iBOT/KoLeo losses + AdamW + EMA) on synthetic crops.

Prints JSON: images/s, step time, model FLOP utilisation (GPU) and peak memory. Used by ``bench/gpu_check.sh``
(ViT-L/14, batch 32, 2x224 + 8x98 crops) and by ``bench/train_step.py`` on CPU.

    python bench/ssl_step.py --arch vit_large --batch 32 --global-size 224 --local-size 98 --attn sdpa
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def vit_flops(dim: int, depth: int, tokens: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of one image (multiply-add = 2 FLOPs): qkv/proj/MLP matmuls plus attention scores."""
    per_layer = 2 * tokens * dim * (3 * dim + dim + 2 * mlp_ratio * dim) + 2 * 2 * tokens * tokens * dim
    return depth * per_layer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", default="vit_large")
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=98)
    p.add_argument("--locals", type=int, default=8)
    p.add_argument("--prototypes", type=int, default=65536)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "math", "xformers"])
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device (H100/H200)")
    args = p.parse_args()

    from core.config.pretrain import PretrainRecipe
    from core.data import MaskingGenerator, collate_data_and_cast
    from core.models import ARCH_SIZES, xformers_available
    from core.ssl.build import build_meta_arch
    from core.train.loop import _param_groups

    if args.attn == "xformers" and not xformers_available():
        print(json.dumps({"attn": "xformers", "skipped": "xformers is not importable here"}))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Built directly from the schema (no OmegaConf needed on a bare GPU image).
    recipe = PretrainRecipe()
    m, c = recipe.model, recipe.crops
    m.arch, m.patch_size, m.img_size, m.attn_backend, m.drop_path_rate = (
        args.arch,
        args.patch,
        args.global_size,
        args.attn,
        0.4,
    )
    c.global_crops_size, c.local_crops_size, c.local_crops_number = args.global_size, args.local_size, args.locals
    recipe.dino.head.n_prototypes = recipe.ibot.head.n_prototypes = args.prototypes
    recipe.validate()
    meta = build_meta_arch(recipe).to(device)
    opt = torch.optim.AdamW([{"params": g["params"]} for g in _param_groups(meta, recipe)], lr=1e-4)
    grid = args.global_size // args.patch
    masker = MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid)
    g, s = args.global_size, args.local_size
    samples = [
        {
            "global_crops": [torch.randn(3, g, g) for _ in range(2)],
            "local_crops": [torch.randn(3, s, s) for _ in range(args.locals)],
        }
        for _ in range(args.batch)
    ]
    batch = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, grid * grid, masker)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def step() -> None:
        with torch.autocast(device, dtype=dtype, enabled=args.precision == "bf16"):
            losses = meta(batch, teacher_temp=0.07)
        losses["total"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for t, st in zip(meta.teacher.parameters(), meta.student.parameters(), strict=False):
                t.lerp_(st.detach(), 0.006)

    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    dim, depth, _ = ARCH_SIZES[args.arch]
    n_g, n_l = grid * grid + 1, (s // args.patch) ** 2 + 1
    # student fwd+bwd (3x fwd) on 2 globals + locals, teacher fwd on 2 globals; heads ignored (small).
    flops = args.batch * (
        3 * (2 * vit_flops(dim, depth, n_g) + args.locals * vit_flops(dim, depth, n_l)) + 2 * vit_flops(dim, depth, n_g)
    )
    out = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "arch": f"{args.arch}/{args.patch}",
        "batch": args.batch,
        "crops": f"2x{g} + {args.locals}x{s}",
        "attn": args.attn,
        "precision": args.precision,
        "s_per_step": round(dt, 4),
        "images_per_s": round(args.batch / dt, 2),
        "model_tflops_per_step": round(flops / 1e12, 2),
    }
    if device == "cuda":
        out["mfu"] = round(flops / dt / (args.peak_tflops * 1e12), 4)
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
