"""The downstream sections of the demo report: canopy height and cell profiles, each against its baselines.

Both read only files (``metrics.json`` of the runs, the plate map as CSV), so core learns nothing of the domains but
the paths the demo's steps write (:data:`CANOPY_RUNS`, :data:`CELL_RUNS`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from core.report import figures as figs
from core.report.html import Figure, Raw, definitions, figures, paragraph, table

CANOPY_RUNS = {
    "pretrained": "canopy_fit",
    "random init": "baselines/canopy_random",
    "colour statistics": "baselines/canopy_statistics",
}
CANOPY_EVALUATION = "canopy/evaluation"
CELL_RUNS = {
    "pretrained": "cells/evaluation",
    "random init": "cells/baselines/evaluation_random",
    "intensity statistics": "cells/baselines/evaluation_statistics",
}
PLATEMAP = "cells/screen/platemap.csv"

CANOPY_DEFINITIONS = [
    ("MAE", "mean absolute error of the predicted height, in metres, over valid validation pixels (lower is better)."),
    ("RMSE", "root mean squared error in metres: like MAE, but large errors weigh more."),
    (
        "R²",
        "1 - (squared error / variance of the reference): 1 is perfect, 0 is no better than predicting the "
        "validation mean, below 0 is worse.",
    ),
    ("bias", "mean of (predicted - reference) in metres: negative means heights are underestimated."),
    ("validation", "chips from spatial blocks that no training chip touches, so neighbouring pixels cannot leak."),
    ("training mean", "predicting the mean training height everywhere: the floor any model must beat."),
    (
        "colour statistics",
        "a fixed read-out of each 4 x 4 patch: the mean of each colour channel over the patch and "
        "its four quadrants (15 values; nothing learned before the head).",
    ),
]
CELL_DEFINITIONS = [
    (
        "mAP",
        "copairs mean average precision of phenotypic activity: each well of a treatment ranks the other wells "
        "of its plate (its replicates and the DMSO controls) by cosine similarity of the normalised profiles; AP "
        "rewards replicates ranked first; mAP averages over the wells. 1 is perfect; near the share of replicates "
        "among the candidates is chance.",
    ),
    (
        "retrieved",
        "q-value (permutation p-value, Benjamini-Hochberg corrected) below 0.05 with at least 3 replicate "
        "wells: the treatment is called active.",
    ),
    (
        "active / inert",
        "the synthetic screen's truth: active treatments change cells; inert ones draw cells from the "
        "same distribution as DMSO, so calling them active is a false hit.",
    ),
    ("kNN accuracy", "share of wells whose nearest well on the other plate (cosine, 1-NN) has the same treatment."),
    (
        "intensity statistics",
        "a fixed read-out of each cell crop: the mean of each channel in six rings around the "
        "nucleus centre (30 values; nothing learned).",
    ),
]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _verdict(
    ours: float | None, best: tuple[str, float] | None, lower_is_better: bool, tolerance: float, what: str, why: str
) -> Raw:
    if ours is None or best is None:
        return paragraph("Not enough results for a verdict yet.", "note")
    name, theirs = best
    gain = (theirs - ours) if lower_is_better else (ours - theirs)
    if gain > tolerance:
        return paragraph(
            f"Pretraining wins: {what} {ours:.3g} against {theirs:.3g} for the best baseline ({name}).", "verdict win"
        )
    level = abs(gain) <= tolerance
    head = "Pretraining does not win: level with" if level else "Pretraining loses to"
    return paragraph(
        f"{head} the best baseline ({name}): {what} {ours:.3g} against {theirs:.3g}. Why: {why}",
        "verdict" if level else "verdict loss",
    )


def canopy_section(out: Path, report_dir: Path) -> Raw:
    """One head recipe on three backbones, plus the training-mean floor; figures, definitions and a verdict."""
    results = {m: _read_json(out / p / "metrics.json") for m, p in CANOPY_RUNS.items()}
    parts: list[str] = [
        paragraph(
            "A linear 256-bin height head is trained on frozen features of synthetic forest orthophotos (0.5 m "
            "pixels) against lidar-like canopy-height models, and validated on spatial blocks it never saw. The "
            "head recipe is the same for every row; only the backbone changes."
        )
    ]
    rows, mae = [], {}
    for method, result in results.items():
        if result and "val" in result:
            v = result["val"]
            rows.append([method, v.get("mae"), v.get("rmse"), v.get("r2"), v.get("bias")])
            mae[method] = v.get("mae")
    floor = (results.get("pretrained") or {}).get("baseline_train_mean")
    if floor:
        rows.append(["training mean", floor.get("mae"), floor.get("rmse"), floor.get("r2"), floor.get("bias")])
        mae["training mean"] = floor.get("mae")
    if not rows:
        parts.append(paragraph("The canopy fits have not run yet.", "note"))
        return Raw("".join(parts))
    parts.append(table(["backbone", "MAE (m)", "RMSE (m)", "R²", "bias (m)"], rows, best=0, digits=(0, 2, 2, 3, 2)))
    parts.append(definitions(CANOPY_DEFINITIONS))
    shown = [
        Figure(
            out / CANOPY_RUNS["pretrained"] / "pred_vs_ref.png",
            "Predicted against reference, pretrained",
            "Each validation pixel's predicted height (y) against the lidar height (x); colour counts pixels on a "
            "log scale. On the dashed 1:1 line a prediction is exact; a flat top means heights above it are never "
            "predicted.",
        ),
        Figure(
            out / CANOPY_RUNS["random init"] / "pred_vs_ref.png",
            "Predicted against reference, random init",
            "The same head on the random-init twin, read the same way: compare the spread around the 1:1 line "
            "with the figure beside it.",
        ),
        Figure(
            out / CANOPY_EVALUATION / "maps.png",
            "Height maps of a whole scene",
            "The pretrained model's seamless tiled prediction of forest scene 0 (left) next to its reference CHM "
            "(right), on one colour scale in metres; gaps are nodata. Crowns should match in place and size.",
        ),
        Figure(
            out / "canopy" / "OSBS_029_height.png",
            "A real NEON orthophoto",
            "The same model on a real 0.1 m NEON image (OSBS_029) it never trained for: a check that the "
            "georeferenced path works on real data, not a measure of accuracy (nothing here was trained on it).",
        ),
    ]
    parts.append(figures(shown))
    parts.append(_saturation_note(out))
    best = min(
        ((m, v) for m, v in mae.items() if m != "pretrained" and v is not None), key=lambda x: x[1], default=None
    )
    parts.append(
        _verdict(
            mae.get("pretrained"),
            best,
            lower_is_better=True,
            tolerance=0.05 * (best[1] if best else 0),
            what="validation MAE (m)",
            why="the backbone was pretrained on object scenes, not forests, and what it learned there (an object's "
            "shape and texture under colour changes) is not what height needs (crown size and shadow length). A "
            "random ViT already mixes neighbouring patches, and the head learns the rest from the training chips. "
            "A backbone pretrained on imagery like the target (`dinoscope pretrain recipes/tiny/geo_pretrain.yaml`) "
            "is the fair test of transfer.",
        )
    )
    return Raw("".join(parts))


def _lower_edge(name: str) -> float:
    """The lower edge of a height bin named ``"20-30"`` or ``"60+"`` (``-inf`` when unreadable)."""
    try:
        return float(name.split("-")[0].rstrip("+"))
    except ValueError:
        return float("-inf")


def _saturation_note(out: Path) -> Raw:
    """What the scene evaluation says about tall trees (the per-height-bin bias of ``canopy evaluate``)."""
    evaluation = _read_json(out / CANOPY_EVALUATION / "metrics.json") or {}
    bins = evaluation.get("per_bin") or {}
    tall = [(k, v) for k, v in bins.items() if _lower_edge(k) >= 30 and v.get("n")]
    if not tall:
        return Raw("")
    n_ref = sum(v["n"] for _, v in tall)
    n_pred = sum(v.get("n_pred") or 0 for _, v in tall)
    bias = sum(v["bias"] * v["n"] for _, v in tall) / n_ref
    return paragraph(
        f"Tall trees: {n_ref:,} reference pixels of scene 0 are 30 m or taller, and {n_pred:,} pixels are predicted "
        f"that tall; their heights are off by {bias:+.1f} m on average. The head reads height from what a 4-pixel "
        "patch and its two attention layers see, and the largest crowns look alike to it; with an L1 loss it then "
        "predicts the median height of everything that looks alike, so tall stands are flattened. Expect this from "
        "any small frozen backbone with a linear head: a DPT head (head.type=dpt) or a larger backbone sees more "
        "context.",
        "verdict loss" if bias < -5 else "note",
    )


def _roles(out: Path) -> dict[str, str]:
    try:
        with (out / PLATEMAP).open(newline="") as f:
            return {row["treatment"]: row["role"] for row in csv.DictReader(f) if "treatment" in row and "role" in row}
    except (OSError, KeyError, csv.Error):
        return {}


def cells_section(out: Path, report_dir: Path) -> Raw:
    """Profiles of the pretrained cell backbone, its random twin and intensity statistics, scored alike."""
    results = {m: _read_json(out / p / "metrics.json") for m, p in CELL_RUNS.items()}
    results = {m: r for m, r in results.items() if r and "activity" in r}
    parts: list[str] = [
        paragraph(
            "A synthetic Cell Painting screen (2 plates, 5 channels, DMSO controls, 5 active and 2 inert treatments, "
            "plate batch effects) is embedded cell by cell with a channel-adaptive ViT pretrained on its own crops, "
            "aggregated into well profiles, normalised against each plate's DMSO wells and scored with copairs. The "
            "two baselines go through exactly the same embed, profile and evaluate commands."
        )
    ]
    if not results:
        parts.append(paragraph("The cell evaluations have not run yet.", "note"))
        return Raw("".join(parts))
    roles = _roles(out)
    per = {m: {r["label"]: r for r in res["activity"].get("per_label", [])} for m, res in results.items()}
    treatments = sorted({t for p in per.values() for t in p}, key=lambda t: (roles.get(t) != "active", t))
    rows = []
    for method, res in results.items():
        labels = per[method]
        active = [labels[t] for t in treatments if roles.get(t) == "active" and t in labels]
        inert = [labels[t] for t in treatments if roles.get(t) == "inert" and t in labels]
        mean_active = sum(r["mean_average_precision"] for r in active) / len(active) if active else None
        knn = (res.get("knn") or {}).get("treatment_nsb", {}).get("accuracy")
        rows.append(
            [
                method,
                f"{sum(r['hit'] for r in active)} of {len(active)}",
                f"{sum(r['hit'] for r in inert)} of {len(inert)}",
                mean_active,
                knn,
            ]
        )
    parts.append(
        table(
            ["embedding", "active retrieved", "inert called active", "mean mAP of active", "kNN accuracy"],
            rows,
            best=0,
            digits=(0, 0, 0, 3, 2),
        )
    )
    header = ["treatment", "role", *[f"mAP {m}" for m in results]]
    body = [[t, roles.get(t, "?"), *[_map_cell(per[m].get(t)) for m in results]] for t in treatments]
    parts.append(paragraph("Per treatment (* = retrieved):"))
    parts.append(table(header, body))
    parts.append(definitions(CELL_DEFINITIONS))
    bars = figs.grouped_bars(
        treatments,
        {m: [(per[m].get(t) or {}).get("mean_average_precision") for t in treatments] for m in results},
        report_dir / "cells_map.png",
        ylabel="mAP (phenotypic activity)",
        title="mAP per treatment",
    )
    shown = []
    if bars:
        shown.append(
            Figure(
                bars,
                "mAP per treatment and embedding",
                "One group of bars per treatment (active ones first), one bar per embedding: the higher "
                "the bar, the more a treatment's wells resemble each other rather than the controls. "
                "Inert treatments should stay low for every embedding.",
            )
        )
    evaluation = out / CELL_RUNS["pretrained"]
    shown.append(
        Figure(
            evaluation / "pca.png",
            "Well profiles of the pretrained embedding",
            "The first two principal components of the normalised well profiles, coloured by treatment: "
            "wells of an active treatment should cluster away from the DMSO controls.",
        )
    )
    shown.append(
        Figure(
            evaluation / "activity_map.png",
            "Activity mAP with its significance",
            "The cells report's own summary for the pretrained embedding: each treatment's mAP, with "
            "retrieved ones (q < 0.05) marked; the line is the significance threshold.",
        )
    )
    parts.append(figures(shown))
    if (evaluation / "report.html").is_file():
        link = (evaluation / "report.html").relative_to(out).as_posix()
        parts.append(Raw(f"<p>The cells evaluation's full report: <a href='{link}'>{link}</a>.</p>"))
    parts.append(_cells_verdict(per, roles))
    return Raw("".join(parts))


def _cells_verdict(per: dict[str, dict[str, dict]], roles: dict[str, str]) -> Raw:
    """Hits first (what a screen is for), then false hits, then the mean mAP of the active treatments."""
    summary = {}
    for method, labels in per.items():
        active = [t for t in labels if roles.get(t) == "active"]
        hits = {t for t in active if labels[t].get("hit")}
        false = {t for t, r in labels.items() if roles.get(t) == "inert" and r.get("hit")}
        mean = sum(labels[t]["mean_average_precision"] for t in active) / len(active) if active else 0.0
        summary[method] = (hits, false, mean, len(active))
    if "pretrained" not in summary or len(summary) < 2:
        return paragraph("Not enough results for a verdict yet.", "note")
    ours = summary.pop("pretrained")

    def net(item: tuple[set, set, float, int]) -> int:
        return len(item[0]) - len(item[1])

    name, best = max(summary.items(), key=lambda kv: (net(kv[1]), kv[1][2]))
    text = (
        f"The pretrained embedding retrieves {len(ours[0])} of {ours[3]} active treatments with {len(ours[1])} false "
        f"hits (mean mAP of the active ones {ours[2]:.2f}); the best baseline, {name}, retrieves {len(best[0])} with "
        f"{len(best[1])} false hits (mean mAP {best[2]:.2f})."
    )
    only_ours, only_theirs = sorted(ours[0] - best[0]), sorted(best[0] - ours[0])
    if only_ours or only_theirs:
        text += (
            f" Only the pretrained embedding finds: {', '.join(only_ours) or 'none'}; only {name} finds: "
            f"{', '.join(only_theirs) or 'none'}."
        )
    why = (
        " Why: the cell backbone sees each crop z-scored per channel (as Cell-DINO does), so a treatment that only "
        "changes a stain's brightness is invisible to it, while intensity statistics keep brightness and miss changes "
        "of shape and texture; and it trained for seconds on two plates."
    )
    if net(ours) > net(best):
        brightness = (
            " (The cell backbone sees each crop z-scored per channel, so a change of brightness alone is invisible "
            "to it; intensity statistics keep brightness.)"
            if only_theirs
            else ""
        )
        return paragraph("Pretraining wins. " + text + brightness, "verdict win")
    if net(ours) == net(best):
        return paragraph("Pretraining does not win on hits: level. " + text + why, "verdict")
    return paragraph("Pretraining loses. " + text + why, "verdict loss")


def _map_cell(row: dict | None) -> str:
    if not row:
        return "\u2013"
    return f"{row['mean_average_precision']:.2f}{' *' if row.get('hit') else ''}"
