"""Pictures of a run: the loss curves from ``metrics.jsonl``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from core.plots import loss_curves


def write_loss_curve(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path | None:
    """Plot every ``loss/*`` series against the iteration, with the lr on a twin axis; ``None`` without rows."""
    path = Path(metrics_path)
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    its = [r["iteration"] for r in rows]
    keys = sorted({k for r in rows for k in r if k.startswith("loss/")})
    series = {key[5:]: (its, [r.get(key, float("nan")) for r in rows]) for key in keys}
    # Linear y: KoLeo is negative, and the DINO/iBOT losses move within one decade.
    secondary = {"lr": (its, [r.get("lr", float("nan")) for r in rows])} if "lr" in rows[0] else None
    return loss_curves(
        series,
        out_png,
        xlabel="iteration",
        ylabel="loss",
        title="pretraining losses",
        styles={"total": {"lw": 1.4}},
        secondary=secondary,
    )
