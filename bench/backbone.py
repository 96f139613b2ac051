"""ViT-S/14 at 224 on CPU: images/s and peak memory, forward and forward+backward, fp32 and bf16, SDPA vs math.

Prints one JSON object. Every configuration runs in the same process, side by side, so the ratios are meaningful;
peak memory is the growth of the process RSS high-water mark over a baseline, so it is measured in a fresh
subprocess per configuration.

    python bench/backbone.py [--batch 8] [--steps 3] [--arch vit_small]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(arch: str, batch: int, steps: int, dtype: str, backend: str, mode: str) -> dict:
    from core.models import build_backbone

    torch.manual_seed(0)
    model = build_backbone(arch, patch_size=14, img_size=224, init_values=1.0)
    model.set_attention_backend(backend)
    model.train(mode == "fwd_bwd")
    x = torch.randn(batch, 3, 224, 224)
    base = _rss_mb()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            if mode == "fwd_bwd":
                model(x).float().sum().backward()
                model.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    model(x)

    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    median = sorted(times)[len(times) // 2]
    return {
        "images_per_s": round(batch / median, 3),
        "s_per_step": round(median, 4),
        "peak_rss_growth_mb": round(_rss_mb() - base, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: dtype,backend,mode
    args = parser.parse_args()
    if args.one:
        dtype, backend, mode = args.one.split(",")
        print(json.dumps(run_one(args.arch, args.batch, args.steps, dtype, backend, mode)))
        return
    results: dict = {
        "arch": f"{args.arch}/14",
        "img_size": 224,
        "batch": args.batch,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "runs": {},
    }
    for mode in ("fwd", "fwd_bwd"):
        for dtype in ("fp32", "bf16"):
            for backend in ("sdpa", "math"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--arch",
                    args.arch,
                    "--batch",
                    str(args.batch),
                    "--steps",
                    str(args.steps),
                    "--one",
                    f"{dtype},{backend},{mode}",
                ]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                results["runs"][f"{mode}/{dtype}/{backend}"] = json.loads(out.strip().splitlines()[-1])
    runs = results["runs"]
    results["sdpa_speedup_vs_math"] = {
        f"{m}/{d}": round(runs[f"{m}/{d}/sdpa"]["images_per_s"] / runs[f"{m}/{d}/math"]["images_per_s"], 3)
        for m in ("fwd", "fwd_bwd")
        for d in ("fp32", "bf16")
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
