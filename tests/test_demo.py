"""The main job (`dinoscope demo --quick`) runs end to end on embedded data: the canopy head and the cell embeddings
sit on the backbones the demo pretrained, every task is compared with its baselines on one self-contained page, a
re-run keeps the first run's timings, and headless Chromium reads the page (screenshot saved next to it)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from core.cli import main
from core.cli.demo import DEMO_FILE, run_demo
from core.config.commands import DemoCfg
from core.errors import DinoscopeError
from core.report.browser import find_chromium, inspect_page

SECTIONS = ["pretraining", "canopy", "cells", "details"]
N_STEPS = len(yaml.safe_load(DEMO_FILE.read_text())["steps"])


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_downstream_tasks_use_the_pretrained_backbones(demo: Path) -> None:
    fit = json.loads((demo / "canopy_fit" / "metrics.json").read_text())
    assert fit["backbone"]["weights"] == str((demo / "backbone.safetensors").resolve())
    random_fit = json.loads((demo / "baselines" / "canopy_random" / "metrics.json").read_text())
    assert random_fit["backbone"]["weights"] == str((demo / "baselines" / "random_backbone.safetensors").resolve())
    embedded = json.loads((demo / "cells" / "embed" / "embed_config.json").read_text())
    assert embedded["weights"] == _sha256(demo / "cells" / "backbone.safetensors")
    statistics = json.loads((demo / "cells" / "baselines" / "embed_statistics" / "embed_config.json").read_text())
    assert statistics["normalisation"]["method"] == "meta"  # absolute intensities, not per-crop z-scores
    knn = json.loads((demo / "knn_comparison.json").read_text())
    methods = {r["method"] for r in knn["rows"]}
    assert methods == {"pretrained", "random init", "raw pixels", "channel statistics"}


def test_the_page_compares_each_task_with_its_baselines(demo: Path) -> None:
    html = (demo / "index.html").read_text()
    assert all(f"<section id='{s}'>" in html for s in SECTIONS)
    sources = re.findall(r"<img src='([^']*)'", html)
    assert len(sources) >= 6 and all(s.startswith("data:image/png;base64,") for s in sources)
    links = [link for link in re.findall(r"href='([^']*)'", html) if not link.startswith("#")]
    assert links == ["cells/evaluation/report.html"] and (demo / links[0]).is_file()
    for row in (
        "<td>pretrained</td><td>class token</td>",
        "<td>raw pixels</td>",
        "<td>training mean</td>",
        "<td>random init</td>",
        "<td>colour statistics</td>",
        "<td>intensity statistics</td>",
    ):
        assert row in html
    assert html.count("class='verdict") >= 3 and "these numbers mean nothing" in html
    assert f"{N_STEPS} steps" in html


def test_rerun_resumes_and_keeps_the_first_timings(demo: Path) -> None:
    markers = sorted((demo / ".done").glob("*.json"))
    assert len(markers) == N_STEPS
    first = {p.name: json.loads(p.read_text()) for p in markers}
    assert all(r["status"] == "ran" and r["seconds"] >= 0 for r in first.values())
    assert main(["demo", "--quick", "--out", str(demo)]) == 0
    assert {p.name: json.loads(p.read_text()) for p in markers} == first
    html = (demo / "index.html").read_text()
    assert html.count("<td>done in an earlier run</td>") == N_STEPS
    pretrain = first["01.json"]
    finished = pretrain["finished"].replace("T", " ").replace("+00:00", "")
    assert f"<td class='num'>{pretrain['seconds']:.1f}</td><td>{finished}</td>" in html


def test_a_full_run_refuses_a_quick_runs_directory(demo: Path) -> None:
    before = sorted(p.stat().st_mtime_ns for p in (demo / ".done").glob("*.json"))
    with pytest.raises(DinoscopeError, match="made with --quick"):
        run_demo(DemoCfg(out=str(demo), quick=False), None, None)
    assert sorted(p.stat().st_mtime_ns for p in (demo / ".done").glob("*.json")) == before


@pytest.mark.skipif(
    find_chromium() is None,
    reason="Chromium and chromedriver are not installed (Debian: apt-get "
    "install chromium chromium-driver; .ci/run installs them where it can)",
)
def test_headless_chromium_reads_the_demo_page(demo: Path, tmp_path: Path) -> None:
    view = inspect_page(demo / "index.html", demo / "screenshot.png", *find_chromium())
    shutil.copy(view.screenshot, tmp_path / "screenshot.png")
    assert view.problems(SECTIONS, min_images=6) == []
    assert view.height > 3000 and (tmp_path / "screenshot.png").stat().st_size > 50_000


def test_a_failed_step_still_writes_the_page_and_is_retried(tmp_path: Path) -> None:
    steps = tmp_path / "steps.yaml"
    steps.write_text(
        yaml.safe_dump(
            {
                "steps": [
                    {
                        "name": "twin of nothing",
                        "call": "random_twin",
                        "args": {"like": "{out}/missing.safetensors", "out": "{out}/twin.safetensors"},
                    }
                ]
            }
        )
    )
    out = tmp_path / "out"
    with pytest.raises(DinoscopeError, match=r"demo step 1 \(twin of nothing\) failed"):
        run_demo(DemoCfg(out=str(out), steps=str(steps)), None, None)
    html = (out / "index.html").read_text()
    assert "<td>twin of nothing</td><td>failed</td>" in html and "random_twin like=" in html
    assert not (out / ".done" / "01.json").exists()  # a re-run tries the step again
