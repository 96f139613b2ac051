"""Images/s and peak RSS of SSL training steps at a small CPU config: single process vs 2-process DeepSpeed
ZeRO-2 and ZeRO-3 (gloo), side by side in one run. Prints JSON.

It also prices the per-module gradient-norm logging (``train.log_grad_norms``): single process and 2-process ZeRO-2
each run with it on and off, with ``optim.clip_grad=0`` (so nothing but the logging computes the norms) and
``train.log_every=1`` (so every step would). ``grad_norm_logging`` reports images/s on and off and their ratio.
The on/off runs alternate (on, off, then off, on, ... for ``--repeats``), each side keeps its best repeat, and every
process runs one OpenMP thread, so bursts of load from other processes on a shared machine do not decide the ratio.

Each configuration runs the real CLI (``dinoscope pretrain`` on ``recipes/tiny/pretrain.yaml``) in a fresh
subprocess; throughput is the median of the per-iteration rates after warm-up, as logged in ``metrics.jsonl``;
peak RSS is the largest resident set of any process of that run (``RUSAGE_CHILDREN`` of a per-run wrapper process,
so one run's peak never carries over to the next).

    python bench/train_step.py [--iters 12] [--batch 16] [--repeats 2] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs the command, then writes the largest RSS (KiB) of any of its descendants to argv[1]: RUSAGE_CHILDREN of this
# process covers exactly one configuration (torchrun waits for its workers, so they count too).
_PEAK_RSS_WRAPPER = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
    "sys.exit(rc)"
)


def run_config(
    name: str, extra: list[str], nproc: int, iters: int, batch: int, workdir: Path, threads: int | None = None
) -> dict:
    """One configuration in a fresh process tree; ``threads`` per process defaults to the cores shared out."""
    run = workdir / name
    common = [
        str(ROOT / "recipes" / "tiny" / "pretrain.yaml"),
        f"train.max_iters={iters}",
        f"train.checkpoint_every={iters}",
        "train.log_every=1",
        f"train.batch_size_per_rank={batch}",
        "optim.warmup_epochs=0.02",
        "teacher.warmup_teacher_temp_epochs=0.02",
        "optim.freeze_last_layer_epochs=0.01",
        *extra,
        "--output-dir",
        str(run),
    ]
    if nproc == 1:
        cmd = [sys.executable, "-m", "core.cli", "pretrain", *common]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "core.cli",
            "pretrain",
            *common,
        ]
    env = {
        **os.environ,
        "DINOSCOPE_NO_PROGRESS": "1",
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": str(threads or max(1, (os.cpu_count() or 2) // nproc)),
    }
    rss_file = workdir / f"{name}.maxrss"
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_WRAPPER, str(rss_file), *cmd],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        return {"error": proc.stderr[-1500:]}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows[2:]] or [r["images_per_s"] for r in rows]
    return {
        "processes": nproc,
        "images_per_s": round(statistics.median(rates), 2),
        "global_batch": batch * nproc,
        "peak_rss_mb": round(int(rss_file.read_text()) / 1024, 1),
        "final_loss": rows[-1]["loss/total"],
        # Proof that train.log_grad_norms took effect: the metrics carry grad_norm/* keys exactly when on.
        "grad_norms_logged": any(key.startswith("grad_norm/") for key in rows[-1]),
    }


def grad_norm_pair(base: str, extra: list[str], nproc: int, args: argparse.Namespace, workdir: Path) -> dict:
    """Gradient-norm logging on vs off for one strategy: alternating repeats, best images/s of each side."""
    sides: dict[str, list[dict]] = {"on": [], "off": []}
    for rep in range(args.repeats):
        for state in ("on", "off") if rep % 2 == 0 else ("off", "on"):
            overrides = [*extra, "optim.clip_grad=0", f"train.log_grad_norms={'true' if state == 'on' else 'false'}"]
            # One thread per process: with OpenMP threads = cores, a single process on a shared, busy machine
            # stalls at every parallel region's barrier (seen here: 5-10x slower, erratic), which would swamp the
            # difference being measured.
            sides[state].append(
                run_config(
                    f"{base}_gradnorm_{state}_{rep}", overrides, nproc, args.iters, args.batch, workdir, threads=1
                )
            )
    out: dict = {}
    for state, runs in sides.items():
        ok = [r for r in runs if "images_per_s" in r]
        if not ok:
            out[f"error_{state}"] = runs[-1].get("error", "no run")
            continue
        out[f"images_per_s_{state}"] = max(r["images_per_s"] for r in ok)
        out[f"repeats_{state}"] = [r["images_per_s"] for r in ok]
        out[f"grad_norms_logged_{state}"] = all(r["grad_norms_logged"] for r in ok)
    if "images_per_s_on" in out and "images_per_s_off" in out:
        out["on_over_off"] = round(out["images_per_s_on"] / out["images_per_s_off"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--batch", type=int, default=16, help="batch per rank")
    p.add_argument("--repeats", type=int, default=2, help="runs of each side of a gradient-norm on/off pair")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="OpenMP threads per process of the strategy comparison (default: cores / processes)",
    )
    args = p.parse_args()
    zero2 = ["dist.strategy=deepspeed", "dist.zero_stage=2"]
    configs = {
        "single": ([], 1),
        "zero2_2proc": (zero2, 2),
        "zero3_2proc": (["dist.strategy=deepspeed", "dist.zero_stage=3"], 2),
    }
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            name: run_config(name, extra, n, args.iters, args.batch, Path(tmp), threads=args.threads or None)
            for name, (extra, n) in configs.items()
        }
        grad_norm_logging = {
            base: grad_norm_pair(base, extra, n, args, Path(tmp))
            for base, (extra, n) in (("single", ([], 1)), ("zero2_2proc", (zero2, 2)))
        }
    single = results["single"].get("images_per_s")
    for r in results.values():
        if single and "images_per_s" in r:
            r["throughput_vs_single"] = round(r["images_per_s"] / single, 3)
    print(
        json.dumps(
            {
                "config": "tiny recipe (vit_test/8, 2x32 + 2x16 crops)",
                "cpu_count": os.cpu_count(),
                "iters": args.iters,
                "batch_per_rank": args.batch,
                "threads": args.threads or "cores/processes",
                "results": results,
                "grad_norm_logging": grad_norm_logging,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
