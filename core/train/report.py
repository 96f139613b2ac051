"""Pictures of a run: the loss curves from ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from core.io import atomic_path


def write_loss_curve(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path | None:
    """Plot every ``loss/*`` series (log scale when positive) against the iteration, with the lr on a twin axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(metrics_path)
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    its = [r["iteration"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key in sorted({k for r in rows for k in r if k.startswith("loss/")}):
        ax.plot(its, [r.get(key, float("nan")) for r in rows], label=key[5:], lw=1.4 if key == "loss/total" else 1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    if "lr" in rows[0]:
        ax2 = ax.twinx()
        ax2.plot(its, [r["lr"] for r in rows], color="0.6", ls="--", lw=0.8)
        ax2.set_ylabel("learning rate", color="0.5")
    ax.set_title("pretraining losses")
    fig.tight_layout()
    out = Path(out_png)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out
