"""Curation at scale on the CPU: seconds and peak RSS of deduplication and 3-level k-means over random embeddings.

Prints one JSON object. Each (stage, size) runs in a fresh subprocess limited to ``--threads`` torch threads, so its
peak RSS (``ru_maxrss``, the embeddings included) is its own. Wall and CPU seconds are both reported, with the load
average: other processes on a shared machine stretch the wall clock of multi-threaded runs. The embeddings are
random unit vectors with 1% planted near-duplicates (cosine about 0.999), so the dedup figure also reports how many
planted pairs it grouped. Generating the data is not timed.

    python bench/curate.py                              # 100k and 1M x 384, 2 threads
    python bench/curate.py --sizes 20000 --threads 2    # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from core.curate.collection import normalized
from core.curate.dedup import deduplicate
from core.curate.kmeans import hierarchical_kmeans


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def embeddings(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random unit vectors whose last 1% are near-copies of random earlier rows; returns (X, copied rows)."""
    rng = np.random.default_rng(seed)
    X = np.empty((n, dim), np.float32)
    for start in range(0, n, 65536):
        stop = min(n, start + 65536)
        X[start:stop] = rng.standard_normal((stop - start, dim), dtype=np.float32)
    n_copies = n // 100
    originals = rng.choice(n - n_copies, n_copies, replace=False)
    X[n - n_copies :] = X[originals] + 0.03 * rng.standard_normal((n_copies, dim), dtype=np.float32)
    for start in range(0, n, 65536):
        X[start : start + 65536] = normalized(X[start : start + 65536])
    return X, originals


def child(stage: str, n: int, dim: int, threads: int, threshold: float, levels: list[int], iters: int) -> dict:
    """Run one stage on ``n`` embeddings in this process; returns its figures."""
    torch.set_num_threads(threads)
    X, originals = embeddings(n, dim)
    rss_data = _peak_rss_mb()
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    if stage == "dedup":
        result = deduplicate(X, threshold, method="auto")
        copies = np.arange(n - len(originals), n)
        extra = {
            "method": result.method,
            "planted_pairs_grouped": float((result.group[copies] == result.group[originals]).mean()),
            **result.counts(),
        }
    else:
        hierarchy = hierarchical_kmeans(X, levels, iters=iters)
        sizes = np.bincount(hierarchy.labels[:, 0], minlength=levels[0])
        extra = {"levels": levels, "iters": iters, "finest_sizes_min_max": [int(sizes.min()), int(sizes.max())]}
    seconds = time.perf_counter() - t0
    return {
        "stage": stage,
        "n": n,
        "dim": dim,
        "threads": threads,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(_cpu_seconds() - cpu0, 2),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other processes on the machine slow the wall clock
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "peak_rss_before_stage_mb": round(rss_data, 1),
        **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="collection sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run (the issue's 2 CPU cores)")
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--levels", default="1000,100,10", help="k-means clusters per level, finest first")
    parser.add_argument("--iters", type=int, default=20, help="Lloyd iterations per level")
    parser.add_argument("--stages", default="dedup,kmeans")
    parser.add_argument("--child", nargs=2, metavar=("STAGE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    levels = [int(v) for v in args.levels.split(",")]
    if args.child:
        stage, n = args.child[0], int(args.child[1])
        print(json.dumps(child(stage, n, args.dim, args.threads, args.threshold, levels, args.iters)))
        return
    results = []
    for n in (int(v) for v in args.sizes.split(",")):
        for stage in args.stages.split(","):
            command = [sys.executable, __file__, "--child", stage, str(n), "--dim", str(args.dim)]
            command += ["--threads", str(args.threads), "--threshold", str(args.threshold)]
            command += ["--levels", args.levels, "--iters", str(args.iters)]
            env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr)
    print(json.dumps({"torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
