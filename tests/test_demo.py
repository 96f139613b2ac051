"""The main job (`dinoscope demo --quick`) runs end to end on embedded data and writes its HTML report."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.cli import main


def test_quick_demo_runs_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert "loss_curve.png" in page and "knn.json" in page
    assert (out / "backbone.safetensors").exists() and (out / "backbone.json").exists()
    # A second run skips the finished steps.
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    assert "skipped (done earlier)" in (out / "index.html").read_text()
