"""An existing output is never replaced or skipped silently (core.cli.outputs): the same command, settings and
inputs do nothing and say so; anything else is refused unless --overwrite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.cli import main
from core.cli.outputs import DIR_RECORD, record_path

SYNTH = ["canopy", "synth", "--size", "64"]


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_the_same_run_twice_does_nothing_the_second_time_and_says_so(tmp_path: Path, caplog) -> None:
    out = tmp_path / "forest"
    assert main([*SYNTH, str(out)]) == 0
    assert (out / DIR_RECORD).exists()
    before = _mtimes(out)
    caplog.clear()
    assert main([*SYNTH, str(out)]) == 0
    assert "up to date" in caplog.text and _mtimes(out) == before


def test_other_settings_are_refused_naming_the_change_unless_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "forest"
    assert main([*SYNTH, str(out)]) == 0
    assert main([*SYNTH, str(out), "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert "made differently" in err and "seed: 0 -> 5" in err and "--overwrite" in err
    assert main([*SYNTH, str(out), "--seed", "5", "--overwrite"]) == 0
    assert (out / "forest_seed5_rgb.tif").exists()
    assert main([*SYNTH, str(out), "--seed", "5"]) == 0  # the record now describes the new run


def test_a_changed_input_is_refused_and_an_unrecorded_output_is_never_taken_as_done(tmp_path: Path, capsys) -> None:
    forest = tmp_path / "forest"
    assert main([*SYNTH, str(forest)]) == 0
    chm = next(forest.glob("*_chm.tif"))
    evaluate = ["canopy", "evaluate", str(chm), str(chm), "--out", str(tmp_path / "eval")]
    assert main(evaluate) == 0
    os.utime(chm, ns=(chm.stat().st_atime_ns, chm.stat().st_mtime_ns + 10**9))  # the input was rewritten
    assert main(evaluate) == 2
    assert "an input file changed" in capsys.readouterr().err
    foreign = tmp_path / "zonal.gpkg"
    foreign.write_text("made by another tool")
    assert main(["canopy", "zonal", str(chm), str(chm), str(foreign)]) == 2
    assert "was not written by this command" in capsys.readouterr().err
    assert foreign.read_text() == "made by another tool"
    assert not record_path(foreign, "file").exists()


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_records_are_hidden_beside_or_inside_the_output(tmp_path: Path, kind: str) -> None:
    target = tmp_path / ("x.parquet" if kind == "file" else "x")
    assert record_path(target, kind).name.startswith(".")
    assert record_path(target, kind).parent == (tmp_path if kind == "file" else target)
