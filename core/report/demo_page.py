"""``dinoscope demo``'s report: one self-contained page that tells what was trained and what it is worth.

Sections follow the story: pretraining (data, loss, kNN against baselines), canopy height, cell profiles, run
details. Every figure is embedded as a data URI with a caption, every metric table sits next to the definitions of
its metrics, and each task ends in a verdict that says plainly whether pretraining won, and why not where it did
not. The page reads the outputs at the paths that ``core/cli/demo_steps.yaml`` writes (:data:`PATHS`); a missing
output leaves its part of the page saying so, so the page can also be written after a failed step.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml

from core.io import atomic_path
from core.report import figures as figs
from core.report.demo_tasks import canopy_section, cells_section
from core.report.html import Figure, Raw, definitions, esc, figures, page, paragraph, table

# Where the demo's steps write what the page reads (relative to the demo directory).
PATHS = {
    "pretrain": "pretrain",
    "knn": "knn_comparison.json",
    "report_dir": "report",
}

KNN_DEFINITIONS = [
    (
        "kNN top-1",
        "share of held-out scenes whose class is the weighted vote of their k nearest labelled scenes "
        "(cosine similarity of the features, votes weighted by exp(similarity / 0.07); DINO's protocol).",
    ),
    (
        "labelled per class",
        "how many labelled scenes of each class the kNN may look up: a small number is the case "
        "self-supervision is for.",
    ),
    (
        "class token / mean patch token",
        "the two ways to read a ViT: its [CLS] output, or the average of its patch outputs.",
    ),
    (
        "random init",
        "the pretrained architecture with freshly initialised weights and LayerScale 1.0, so every block "
        "mixes the tokens (DINOv2's LayerScale 1e-5 would make the untrained blocks near-identities and the class "
        "token independent of the image).",
    ),
    ("raw pixels", "the scene resized to 32 x 32, normalised, as one 3,072-value vector."),
    ("channel statistics", "each colour channel's mean and standard deviation (6 values)."),
    ("chance", "one over the number of classes (25 %)."),
]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def margin(p: float, n: int) -> float:
    """Half-width (percentage points) of a 95 % interval of the difference of two accuracies near ``p`` % on ``n``."""
    q = min(max(p / 100, 0.01), 0.99)
    return 100 * 1.96 * (2 * q * (1 - q) / max(n, 1)) ** 0.5


def knn_verdict(result: dict[str, Any]) -> Raw:
    """Pretrained class token against the best baseline at each label budget, with the reason where it loses."""
    rows = result["rows"]
    ours = next(r for r in rows if r["method"] == "pretrained" and r["features"] == "class token")
    others = [r for r in rows if r["method"] != "pretrained"]
    wins, ties, losses = [], [], []
    for n in result["per_class"]:
        best = max(others, key=lambda r: r["top1"][str(n)])
        ours_n, theirs = ours["top1"][str(n)], best["top1"][str(n)]
        text = f"{n} a class: {ours_n:.1f} % against {theirs:.1f} % ({best['method']}, {best['features']})"
        gap = margin((ours_n + theirs) / 2, result.get("n_val", 0))
        (wins if ours_n - theirs > gap else losses if theirs - ours_n > gap else ties).append(text)
    parts = []
    if wins:
        parts.append("Pretraining wins with " + "; ".join(wins) + ".")
    if ties:
        parts.append("It is level (the gap is inside the 95 % noise of the held-out set) with " + "; ".join(ties) + ".")
    if losses:
        parts.append(
            "It loses with " + "; ".join(losses) + ". Why: kNN on raw pixels is template matching, and with enough "
            "labelled scenes one of them shows the same object at nearly the same place, size and shade; a "
            "2-block ViT pretrained for two CPU minutes has learned only part of the invariance that would beat that."
        )
    cls = "verdict win" if wins and not losses else "verdict loss" if losses and not wins else "verdict"
    return paragraph(" ".join(parts), cls)


def pretraining_section(out: Path, report_dir: Path, quick: bool) -> Raw:
    """Data samples, loss curve, and the kNN comparison with its table, definitions, figure and verdict."""
    run = out / PATHS["pretrain"]
    recipe = _read_yaml(run / "config.yaml") or {}
    model, data, optim = recipe.get("model", {}), recipe.get("data", {}), recipe.get("optim", {})
    train = recipe.get("train", {})
    iterations = train.get("max_iters") or optim.get("epochs", 0) * optim.get("epoch_length", 0)
    parts: list[str] = [
        paragraph(
            f"A {model.get('arch', '?')} ViT ({model.get('patch_size', '?')}-pixel patches, "
            f"{model.get('img_size', '?')}-pixel global crops) is pretrained with DINOv2's self-supervised losses "
            f"(DINO + iBOT + KoLeo) for {iterations:,} iterations of {train.get('batch_size_per_rank', '?')} images "
            f"on the dataset kind '{data.get('kind', '?')}', without any label. It is then exported and used, frozen, "
            "for everything below."
        )
    ]
    samples = figs.dataset_samples(data.get("kind", ""), data.get("params", {}), report_dir / "pretraining_data.png")
    shown = []
    if samples:
        shown.append(
            Figure(
                samples,
                "What the backbone saw",
                "The first 16 pretraining images with their class (never shown to the model). A class is a "
                "silhouette with its own texture; position, size, colour, background and clutter change from image "
                "to image, so two scenes of one class can differ in almost every pixel.",
            )
        )
    shown.append(
        Figure(
            run / "loss_curve.png",
            "Pretraining loss",
            "Total loss and its parts against the iteration (learning rate dotted, right axis). The DINO terms "
            "(global and local crops) and the iBOT term (masked patches) are cross-entropies between the teacher's "
            "and the student's distributions over 256 prototypes; KoLeo rewards features that spread out. In a "
            "short run they fall little, because the teacher's targets sharpen as its temperature warms up: a flat "
            "total does not mean nothing was learned, and a falling one would not prove the features useful. The "
            "kNN below is the test.",
        )
    )
    parts.append(figures(shown))
    knn = _read_json(out / PATHS["knn"])
    parts.append(Raw("<h3>Does pretraining help? kNN classification of held-out scenes</h3>"))
    if not knn:
        parts.append(paragraph("The kNN comparison has not run yet.", "note"))
        return Raw("".join(parts))
    header = ["method", "features", *[f"{n} labelled per class" for n in knn["per_class"]]]
    body = [[r["method"], r["features"], *[round(r["top1"][str(n)], 1) for n in knn["per_class"]]] for r in knn["rows"]]
    parts.append(
        paragraph(
            f"kNN (k = {knn['k']}) top-1 accuracy in % on {knn['n_val']:,} held-out scenes (another seed), for "
            "several numbers of labelled scenes. Each method is read the way it reads best; the first row is the "
            "pretrained backbone.",
        )
    )
    parts.append(table(header, body, best=0, digits=1))
    parts.append(definitions(KNN_DEFINITIONS))
    curve = figs.knn_curve(knn, report_dir / "knn_labels.png")
    if curve:
        parts.append(
            figures(
                [
                    Figure(
                        curve,
                        "Accuracy against labels",
                        "The table as a picture: each line is a method (solid: class token, dashed: mean patch "
                        "token), the x axis the labelled scenes per class on a log scale, the dotted line chance. A "
                        "line above the others is the better representation at that label budget.",
                    )
                ]
            )
        )
    parts.append(knn_verdict(knn))
    if quick:
        parts.append(paragraph("Quick run (--quick): a few iterations only, so these numbers mean nothing.", "note"))
    return Raw("".join(parts))


def _versions() -> list[list[str]]:
    rows = []
    for name in ("dinoscope", "torch", "numpy", "matplotlib"):
        try:
            rows.append([name, metadata.version(name)])
        except metadata.PackageNotFoundError:
            rows.append([name, "not installed"])
    rows.append(["python", platform.python_version()])
    rows.append(["platform", platform.platform()])
    rows.append(["CPU cores / torch threads", f"{os.cpu_count()} / {torch.get_num_threads()}"])
    return rows


def details_section(out: Path, records: Sequence[dict[str, Any]]) -> Raw:
    """Timings of every step (the first run's, kept across re-runs), versions and the pretraining recipe."""
    total = sum(r.get("seconds") or 0 for r in records)
    rows = [
        [
            i,
            r["step"],
            r.get("status", ""),
            r.get("seconds"),
            str(r.get("finished", "")).replace("T", " ").replace("+00:00", ""),
            Raw(f"<code>{esc(r['command'])}</code>"),
        ]
        for i, r in enumerate(records, 1)
    ]
    parts = [
        paragraph(
            f"{len(records)} steps, {total:,.0f} s of step time in all. A step done in an earlier run keeps the time "
            "it took then (re-running the demo resumes after the last finished step)."
        ),
        table(["#", "step", "status", "seconds", "finished (UTC)", "command"], rows, digits=1, cls="timings"),
        Raw("<h3>Versions</h3>"),
        table(["component", "version"], _versions()),
        Raw("<h3>Pretraining recipe</h3>"),
    ]
    config = out / PATHS["pretrain"] / "config.yaml"
    text = config.read_text() if config.is_file() else "(not written yet)"
    parts.append(Raw(f"<pre>{esc(text)}</pre>"))
    return Raw("".join(parts))


def write_demo_report(out: str | os.PathLike, records: Sequence[dict[str, Any]], *, quick: bool = False) -> Path:
    """Write ``out/index.html`` (and the report's own figures under ``out/report/``); returns the page's path."""
    out = Path(out)
    report_dir = out / PATHS["report_dir"]
    report_dir.mkdir(parents=True, exist_ok=True)
    sections = [
        ("pretraining", "Pretraining", pretraining_section(out, report_dir, quick)),
        ("canopy", "Canopy height", canopy_section(out, report_dir)),
        ("cells", "Cell profiles", cells_section(out, report_dir)),
        ("details", "Run details", details_section(out, records)),
    ]
    lead = (
        "What `dinoscope demo` did on its embedded data, end to end: pretrain a tiny ViT without labels, then use it "
        "for classification, canopy height and cell profiling, each time against fair baselines."
    )
    if quick:
        lead += " This was a quick run (--quick): the numbers only show that every step works."
    html = page("dinoscope demo", lead, sections)
    path = out / "index.html"
    with atomic_path(path) as tmp:
        tmp.write_text(html)
    return path
