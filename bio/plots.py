"""Figures and the HTML report for profile evaluation.

Figures use matplotlib's object API (``Figure`` + Agg), so nothing touches pyplot's global state or needs a
display. The report is one self-contained HTML file: PNGs are embedded as base64, metrics shown as tables.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from sklearn.decomposition import PCA

from bio.profiles import feature_columns, meta_column
from core.io import atomic_path

_MAX_LEGEND = 20
_CONTROL_COLOUR = "#9e9e9e"


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _scatter_by_label(
    coords: np.ndarray, labels: pd.Series, is_control: np.ndarray, title: str, axis: str, path: Path
) -> None:
    """Wells as points coloured by treatment; controls in grey underneath; legend only when readable."""
    fig = _figure(7.5, 5.5)
    ax = fig.add_subplot()
    ax.scatter(
        coords[is_control, 0],
        coords[is_control, 1],
        s=14,
        c=_CONTROL_COLOUR,
        label="negative control",
        alpha=0.7,
        linewidths=0,
    )
    treated = labels[~is_control]
    names = sorted(treated.astype(str).unique())
    tab20 = colormaps["tab20"].colors  # strong hues first, then their light twins; greys are for controls
    palette = [tab20[i] for i in [*range(0, 20, 2), *range(1, 20, 2)] if i not in (14, 15)]
    if len(names) > len(palette):
        palette = list(colormaps["turbo"].resampled(len(names))(np.arange(len(names))))
    for name, colour in zip(names, palette, strict=False):
        rows = np.flatnonzero(~is_control & (labels.astype(str) == name).to_numpy())
        ax.scatter(coords[rows, 0], coords[rows, 1], s=18, color=colour, label=name, linewidths=0)
    ax.set_xlabel(f"{axis} 1")
    ax.set_ylabel(f"{axis} 2")
    ax.set_title(title)
    if len(names) < _MAX_LEGEND:
        ax.legend(fontsize=7, markerscale=1.2, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.savefig(path)


def plot_embedding_2d(
    feats: np.ndarray, labels: pd.Series, is_control: np.ndarray, out_dir: Path, seed: int = 0
) -> dict[str, str]:
    """PCA scatter of wells (plus UMAP when the optional ``umap`` package is importable)."""
    written = {}
    if len(feats) >= 2 and feats.shape[1] >= 2:
        pca = PCA(n_components=2, random_state=seed).fit(feats)
        ratio = pca.explained_variance_ratio_
        _scatter_by_label(
            pca.transform(feats),
            labels,
            is_control,
            f"PCA of well profiles ({ratio[0]:.0%}, {ratio[1]:.0%} variance)",
            "PC",
            out_dir / "pca.png",
        )
        written["pca"] = "pca.png"
    if importlib.util.find_spec("umap") is not None and len(feats) > 10:
        import umap  # deferred: optional (not a bio dependency), only for the UMAP figure

        coords = umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(feats)
        _scatter_by_label(coords, labels, is_control, "UMAP of well profiles", "UMAP", out_dir / "umap.png")
        written["umap"] = "umap.png"
    return written


def plot_map_bars(table: pd.DataFrame, threshold: float, title: str, path: Path) -> None:
    """mAP per label (bars coloured when a hit: q < threshold with enough replicates) above -log10(q) with the
    significance line."""
    table = table.sort_values("mean_average_precision", ascending=False)
    significant = table["hit" if "hit" in table.columns else "below_corrected_p"].to_numpy(bool)
    colours = np.where(significant, "#1f77b4", "#c7c7c7")
    x = np.arange(len(table))
    fig = _figure(max(5.0, 0.35 * len(table) + 2), 6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    top.bar(x, table["mean_average_precision"], color=colours)
    top.set_ylabel("mAP")
    top.set_ylim(0, 1.05)
    top.set_title(f"{title} (blue: q < {threshold:g})")
    q = np.clip(table["corrected_p_value"].to_numpy(float), 1e-12, 1)
    bottom.bar(x, -np.log10(q), color=colours)
    bottom.axhline(-np.log10(threshold), color="#d62728", linestyle="--", linewidth=1, label=f"q = {threshold:g}")
    bottom.set_ylabel("-log10 q")
    bottom.legend(fontsize=7, frameon=False)
    bottom.set_xticks(x, table["label"].astype(str), rotation=90, fontsize=7)
    fig.savefig(path)


def write_figures(
    profiles: pd.DataFrame,
    metrics: dict[str, Any],
    out_dir: Path,
    *,
    treatment_column: str,
    control_column: str,
    control_value: str,
) -> dict[str, str]:
    """Write every figure into ``out_dir``; returns ``{name: file name}``."""
    feats = profiles[feature_columns(profiles)].to_numpy(np.float32)
    labels = profiles[meta_column(treatment_column)]
    is_control = (profiles[meta_column(control_column)].astype(str) == str(control_value)).to_numpy()
    written = plot_embedding_2d(feats, labels, is_control, out_dir)
    for key, title in (("activity", "Phenotypic activity"), ("consistency", "Phenotypic consistency")):
        rows = metrics.get(key, {}).get("per_label")
        if rows:
            plot_map_bars(pd.DataFrame(rows), metrics[key]["threshold"], title, out_dir / f"{key}_map.png")
            written[f"{key}_map"] = f"{key}_map.png"
    return written


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            text = f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _summary_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [{"metric": "profiles", "value": metrics.get("n_profiles")}]
    for key in ("activity", "consistency"):
        section = metrics.get(key, {})
        if "skipped" in section:
            rows.append({"metric": f"{key}", "value": f"skipped: {section['skipped']}"})
        else:
            rows.append({"metric": f"{key} mean mAP", "value": section.get("mean_map")})
            rows.append(
                {
                    "metric": f"{key} fraction retrieved (q < {section.get('threshold')})",
                    "value": section.get("fraction_retrieved"),
                }
            )
    for task, result in metrics.get("knn", {}).items():
        if "skipped" in result:
            rows.append({"metric": f"kNN {task}", "value": f"skipped: {result['skipped']}"})
            continue
        rows.append({"metric": f"kNN {task} accuracy (k={result['k']})", "value": result.get("accuracy")})
        rows.append({"metric": f"kNN {task} macro-F1 (k={result['k']})", "value": result.get("macro_f1")})
    for stage, result in metrics.get("batch_separation", {}).items():
        if "not_applicable" in result:
            rows.append(
                {"metric": f"plate separation ({stage})", "value": f"not applicable: {result['not_applicable']}"}
            )
        for name in ("silhouette", "knn_accuracy", "chance_accuracy"):
            if name in result:
                rows.append({"metric": f"plate separation ({stage}): {name}", "value": result[name]})
    return rows


def _qc_section(provenance: dict[str, Any]) -> str:
    """Cells and QC-flagged cells per well (from the profiles' provenance), and whether --qc dropped them."""
    qc = provenance.get("qc") or {}
    rows = qc.get("per_well") or []
    if not rows:
        return ""
    columns = list(rows[0])
    applied = "dropped before aggregating (--qc)" if qc.get("applied") else "kept (profile without --qc)"
    return f"<h2>quality control per well</h2><p>flagged cells were {applied}</p>" + _table(rows, columns)


def write_report(metrics: dict[str, Any], path: Path) -> None:
    """A small self-contained HTML page: summary table, figures, per-treatment mAP table."""
    out_dir = path.parent
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>dinoscope profile evaluation</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px;text-align:left}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>Profile evaluation</h1><p>{html.escape(str(metrics.get('profiles', '')))}</p>",
        _table(_summary_rows(metrics), ["metric", "value"]),
    ]
    for name, file in metrics.get("figures", {}).items():
        data = base64.b64encode((out_dir / file).read_bytes()).decode()
        parts.append(f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
    for key in ("activity", "consistency"):
        rows = metrics.get(key, {}).get("per_label")
        if rows:
            columns = [
                c
                for c in (
                    "label",
                    "n_replicates",
                    "n_treatments",
                    "mean_average_precision",
                    "p_value",
                    "corrected_p_value",
                    "below_corrected_p",
                    "hit",
                    "flag",
                )
                if c in rows[0]
            ]
            parts.append(f"<h2>{key} per label</h2>" + _table(rows, columns))
    provenance = metrics.get("provenance")
    if provenance:
        parts.append(_qc_section(provenance))
        parts.append(f"<h2>provenance</h2><pre>{html.escape(json.dumps(provenance, indent=2))}</pre>")
    parts.append("</body></html>")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts))
