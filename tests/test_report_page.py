"""The demo report is one self-contained page that tells the story: sections in order, embedded figures with
captions, pretrained-versus-baseline tables with definitions, honest verdicts, kept timings; and headless Chromium
reads it without a broken image or a console error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from core.plots import new_figure, save_png
from core.report import write_demo_report
from core.report.browser import find_chromium, inspect_page
from core.report.html import Raw, fmt, table

SECTIONS = ["pretraining", "canopy", "cells", "details"]
CHROMIUM = find_chromium()


def _png(path: Path, title: str) -> None:
    fig = new_figure(3, 2)
    fig.add_subplot(1, 1, 1).plot([0, 1, 2], [1, 0, 2])
    fig.suptitle(title)
    save_png(fig, path)


def _json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def _regression(mae: float) -> dict:
    return {"mae": mae, "rmse": mae * 1.5, "r2": 1 - mae / 12, "bias": -mae / 4}


def _activity(maps: dict[str, tuple[float, bool]]) -> dict:
    rows = [{"label": t, "mean_average_precision": m, "hit": h} for t, (m, h) in maps.items()]
    return {"activity": {"per_label": rows}, "knn": {"treatment_nsb": {"accuracy": 0.5}}}


def fake_demo(out: Path) -> list[dict]:
    """The files the demo's steps write, with numbers chosen so that each verdict differs."""
    run = out / "pretrain"
    run.mkdir(parents=True)
    recipe = {
        "model": {"arch": "vit_test", "patch_size": 4, "img_size": 32},
        "data": {"kind": "synthetic_scenes", "params": {"n": 64, "size": 48, "seed": 0}},
        "optim": {"epochs": 10, "epoch_length": 100},
        "train": {"batch_size_per_rank": 16, "max_iters": 0},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(recipe))
    _png(run / "loss_curve.png", "loss")
    curve = {"10": 40.0, "250": 55.0}
    rows = [
        {"method": "pretrained", "features": "class token", "top1": curve},
        {"method": "random init", "features": "class token", "top1": {"10": 30.0, "250": 37.0}},
        {"method": "raw pixels", "features": "the 32x32 image", "top1": {"10": 30.0, "250": 70.0}},
    ]
    knn = {"per_class": [10, 250], "k": 10, "n_val": 1000, "classes": ["a", "b", "c", "d"], "rows": rows}
    _json(out / "knn_comparison.json", knn)
    for name, mae in (("canopy_fit", 4.10), ("baselines/canopy_random", 4.15), ("baselines/canopy_statistics", 8.8)):
        result = {"val": _regression(mae), "baseline_train_mean": _regression(11.2)}
        _json(out / name / "metrics.json", result)
        _png(out / name / "pred_vs_ref.png", name)
    per_bin = {"20-30": {"n": 100, "n_pred": 90, "bias": -2.0}, "30-60": {"n": 50, "n_pred": 0, "bias": -13.0}}
    _json(out / "canopy/evaluation/metrics.json", {"per_bin": per_bin})
    _png(out / "canopy/evaluation/maps.png", "maps")
    _png(out / "canopy/OSBS_029_height.png", "neon")
    screen = out / "cells/screen"
    screen.mkdir(parents=True)
    (screen / "platemap.csv").write_text(
        "plate,well,treatment,role\np,A01,grow,active\np,A02,shine,active\np,A03,inert_a,inert\np,A04,DMSO,"
        "negative_control\n"
    )
    evaluations = {
        "cells/evaluation": {"grow": (1.0, True), "shine": (0.6, False), "inert_a": (0.4, False)},
        "cells/baselines/evaluation_random": {"grow": (0.7, False), "shine": (0.5, False), "inert_a": (0.4, False)},
        "cells/baselines/evaluation_statistics": {"grow": (0.6, False), "shine": (1.0, True), "inert_a": (0.5, False)},
    }
    for name, maps in evaluations.items():
        _json(out / name / "metrics.json", _activity(maps))
    _png(out / "cells/evaluation/pca.png", "pca")
    _png(out / "cells/evaluation/activity_map.png", "activity")
    (out / "cells/evaluation/report.html").write_text("<!doctype html><title>cells</title>")
    return [
        {
            "step": "pretrain",
            "command": "dinoscope pretrain r.yaml",
            "status": "done in an earlier run",
            "seconds": 84.2,
            "finished": "2026-01-01T00:00:00+00:00",
        },
        {"step": "<kNN>", "command": "knn_comparison out=x", "status": "ran", "seconds": 4.8},
    ]


@pytest.fixture
def demo_page(tmp_path: Path) -> Path:
    out = tmp_path / "demo"
    return write_demo_report(out, fake_demo(out))


def test_page_is_self_contained_with_every_section_and_captioned_figures(demo_page: Path) -> None:
    html = demo_page.read_text()
    positions = [html.index(f"<section id='{s}'>") for s in SECTIONS]
    assert positions == sorted(positions)
    sources = re.findall(r"<img src='([^']*)'", html)
    assert len(sources) >= 6 and all(s.startswith("data:image/png;base64,") for s in sources)
    links = re.findall(r"href='([^']*)'", html)
    assert [link for link in links if not link.startswith("#")] == ["cells/evaluation/report.html"]
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", html)
    assert len(captions) == len(sources) and all(len(c) > 80 for c in captions)
    assert "<style>" in html and "<link" not in html and "<script" not in html
    assert not re.search(r"\{\s*&quot;|\{\s*\"", html), "no JSON dumped into the page"


def test_each_task_has_a_baseline_table_definitions_and_an_honest_verdict(demo_page: Path) -> None:
    html = demo_page.read_text()
    for header in ("<th>10 labelled per class</th>", "<th>MAE (m)</th>", "<th>mean mAP of active</th>"):
        assert header in html
    assert html.count("<dl class='defs'>") == 3
    assert "<dt>MAE</dt>" in html and "<dt>mAP</dt>" in html and "<dt>kNN top-1</dt>" in html
    # kNN: wins with few labels, loses to raw pixels with many, and says why.
    assert "Pretraining wins with 10 a class: 40.0 % against 30.0 %" in html
    assert "It loses with 250 a class: 55.0 % against 70.0 % (raw pixels" in html and "template matching" in html
    # Canopy: 4.10 against 4.15 m is within 5 %: level, with the reason; tall trees are flagged.
    assert "Pretraining does not win: level with the best baseline (random init)" in html
    assert "50 reference pixels of scene 0 are 30 m or taller, and 0 pixels are predicted that tall" in html
    # Cells: one hit each, different ones: level on hits, and the page names who finds what, and why.
    assert "Pretraining does not win on hits: level." in html
    assert "Only the pretrained embedding finds: grow; only intensity statistics finds: shine." in html
    assert "<td>1.00 *</td>" in html and "<td>1 of 2</td>" in html


def test_timings_of_an_earlier_run_are_shown_and_text_is_escaped(demo_page: Path) -> None:
    html = demo_page.read_text()
    assert "done in an earlier run" in html and "<td class='num'>84.2</td>" in html
    assert "&lt;kNN&gt;" in html and "<kNN>" not in html
    assert "2 steps, 89 s of step time in all" in html


def test_page_of_a_run_that_has_not_got_far_says_what_is_missing(tmp_path: Path) -> None:
    html = write_demo_report(tmp_path / "empty", [], quick=True).read_text()
    assert html.count("not run yet") == 3 and "The canopy fits have not run yet" in html
    assert "quick run (--quick)" in html.lower()
    assert all(f"<section id='{s}'>" in html for s in SECTIONS)


def test_table_formats_numbers_and_keeps_raw_markup() -> None:
    html = table(
        ["a", "b", "c"], [[1.23456, float("nan"), Raw("<code>x</code>")], ["<i>", 1200, None]], digits=(2, 0, 0)
    )
    assert "<td class='num'>1.23</td>" in html and "<td class='num'>\u2013</td>" in html
    assert "<td><code>x</code></td>" in html and "<td>&lt;i&gt;</td>" in html and "<td class='num'>1,200</td>" in html
    assert fmt(True) == "yes" and fmt(12345.6) == "12,346"


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium and chromedriver are not installed (Debian: apt-get install "
    "chromium chromium-driver; .ci/run installs them where it can)",
)
def test_headless_chromium_reads_the_page(demo_page: Path, tmp_path: Path) -> None:
    view = inspect_page(demo_page, tmp_path / "screenshot.png", *CHROMIUM)
    assert view.problems(SECTIONS, min_images=6) == []
    assert view.title == "dinoscope demo" and all(i["data_uri"] for i in view.images)
    assert [s["title"] for s in view.sections] == ["Pretraining", "Canopy height", "Cell profiles", "Run details"]
    shot = view.screenshot.read_bytes()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 20_000


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium and chromedriver are not installed")
def test_headless_chromium_reports_a_broken_image_and_a_console_error(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text(
        "<!doctype html><title>t</title><section id='a'><h2>A</h2><img src='gone.png' alt='gone'>"
        "<script>console.error('boom')</script></section>"
    )
    view = inspect_page(page, None, *CHROMIUM)
    problems = view.problems(["a", "b"], min_images=2)
    assert "section 'b' is missing" in problems and "1 images, expected at least 2" in problems
    assert "image 0 ('gone') did not decode" in problems
    assert any("boom" in p for p in problems) and view.screenshot is None
