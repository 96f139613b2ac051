"""Images/s and peak RSS of SSL training steps at a small CPU config: single process vs 2-process DeepSpeed
ZeRO-2 and ZeRO-3 (gloo), side by side in one run. Prints JSON.

Each configuration runs the real CLI (``dinoscope pretrain`` on ``recipes/tiny/pretrain.yaml``) in a fresh
subprocess; throughput is the median of the per-iteration rates after warm-up, as logged in ``metrics.jsonl``;
peak RSS is the largest resident set of any process of that run (``RUSAGE_CHILDREN``).

    python bench/train_step.py [--iters 12] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_config(name: str, extra: list[str], nproc: int, iters: int, batch: int, workdir: Path) -> dict:
    run = workdir / name
    common = [str(ROOT / "recipes" / "tiny" / "pretrain.yaml"), f"train.max_iters={iters}",
              f"train.checkpoint_every={iters}", "train.log_every=1", f"train.batch_size_per_rank={batch}",
              "optim.warmup_epochs=0.02", "teacher.warmup_teacher_temp_epochs=0.02",
              "optim.freeze_last_layer_epochs=0.01", *extra, "--output-dir", str(run)]
    if nproc == 1:
        cmd = [sys.executable, "-m", "core.cli", "pretrain", *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "core.cli", "pretrain", *common]
    env = {**os.environ, "DINOSCOPE_NO_PROGRESS": "1", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr[-1500:]}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows[2:]] or [r["images_per_s"] for r in rows]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"processes": nproc, "images_per_s": round(statistics.median(rates), 2),
            "global_batch": batch * nproc, "peak_rss_mb": round(max(peak, before) / 1024, 1),
            "final_loss": rows[-1]["loss/total"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--batch", type=int, default=16, help="batch per rank")
    args = p.parse_args()
    configs = {
        "single": ([], 1),
        "zero2_2proc": (["dist.strategy=deepspeed", "dist.zero_stage=2"], 2),
        "zero3_2proc": (["dist.strategy=deepspeed", "dist.zero_stage=3"], 2),
    }
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run_config(name, extra, n, args.iters, args.batch, Path(tmp))
                   for name, (extra, n) in configs.items()}
    single = results["single"].get("images_per_s")
    for name, r in results.items():
        if single and "images_per_s" in r:
            r["throughput_vs_single"] = round(r["images_per_s"] / single, 3)
    print(json.dumps({"config": "tiny recipe (vit_test/8, 2x32 + 2x16 crops)", "cpu_count": os.cpu_count(),
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
