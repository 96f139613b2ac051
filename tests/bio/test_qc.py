"""Per-cell quality control: focus, saturation, debris and edge flags measured before embedding, stored per cell,
dropped by `cells profile --qc` and counted per well in the evaluation report (fixture ``weights`` comes from
``conftest.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import gaussian_filter

from bio.cells import crop_cells
from bio.qc import QcThresholds, flag_cells, measure_cells, plate_medians, saturation_levels
from bio.synthetic import make_plate
from core.cli import main


@pytest.fixture(scope="module")
def planted(weights: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """A two-plate screen with 3 blurred fields and 1 saturated well per plate, embedded from the command line."""
    root = tmp_path_factory.mktemp("planted")
    screen = make_plate(
        root / "screen", n_rows=3, n_cols=4, fields=2, size=96, plates=2, seed=5, blurred_fields=3, saturated_wells=1
    )
    run = root / "run"
    args = [*map(str, screen.plates), "--weights", str(weights), "--centroids", "table"]
    args += ["--nuclei-table", str(screen.nuclei), "--crop-size", "32", "--out", str(run)]
    assert main(["cells", "embed", *args]) == 0
    return screen, run


def test_qc_flags_at_least_90_percent_of_planted_cells_with_at_most_5_percent_false_flags(planted: tuple) -> None:
    screen, run = planted
    cells = pd.read_parquet(run / "cells.parquet")
    field = cells["plate"] + "/" + cells["well"] + "/" + cells["site"]
    blurred = field.isin(screen.planted["blurred_fields"]).to_numpy()
    saturated = (cells["plate"] + "/" + cells["well"]).isin(screen.planted["saturated_wells"]).to_numpy()
    assert blurred.sum() >= 18 and saturated.sum() >= 12 and len(screen.planted["blurred_fields"]) == 6
    flagged = cells[["qc_blur", "qc_saturated", "qc_debris"]].to_numpy().any(axis=1)
    planted_cells = blurred | saturated
    recall = flagged[planted_cells].mean()
    false_rate = flagged[~planted_cells].mean()
    assert recall >= 0.9 and false_rate <= 0.05, (recall, false_rate)
    # each defect is flagged as what it is
    assert cells.loc[blurred, "qc_blur"].mean() >= 0.9 and cells.loc[saturated, "qc_saturated"].mean() >= 0.9
    assert not cells.loc[~saturated, "qc_saturated"].any()
    assert cells.loc[~blurred, "focus_DNA"].median() > 2 * cells.loc[blurred, "focus_DNA"].median()


def test_profile_qc_drops_flagged_cells_and_the_report_counts_them_per_well(
    planted: tuple, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    screen, run = planted
    cells = pd.read_parquet(run / "cells.parquet")
    out = tmp_path / "p.parquet"
    base = ["cells", "profile", str(run), "--platemap", str(screen.platemap), "--out", str(out)]
    assert main([*base, "--qc"]) == 2  # every cell of a saturated well is flagged: the well would vanish
    err = capsys.readouterr().err
    assert "plate-map well(s) have no cell in the run" in err and "after --qc dropped flagged cells" in err
    assert screen.planted["saturated_wells"][0] in err and not out.exists()
    assert main([*base, "--qc", "--allow-missing-wells"]) == 0
    assert "QC dropped" in capsys.readouterr().err
    evaluated = tmp_path / "eval"
    assert main(["cells", "evaluate", str(out), "--out", str(evaluated), "--null-size", "200"]) == 0
    metrics = json.loads((evaluated / "metrics.json").read_text())
    counts = pd.DataFrame(metrics["provenance"]["qc"]["per_well"]).set_index(["plate", "well"])
    flags = cells[["edge", "qc_blur", "qc_saturated", "qc_debris"]].any(axis=1)
    want = cells.assign(flagged=flags).groupby(["plate", "well"])["flagged"].agg(["size", "sum"])
    assert counts["n_cells"].to_dict() == want["size"].to_dict()
    assert counts["n_flagged"].to_dict() == want["sum"].to_dict()
    assert counts["n_saturated"].sum() == cells["qc_saturated"].sum() and metrics["provenance"]["qc"]["applied"]
    profiles = pd.read_parquet(out)
    kept = (want["size"] - want["sum"]).rename("kept")
    got = profiles.set_index(["Metadata_Plate", "Metadata_Well"])["Metadata_n_cells"]
    assert got.to_dict() == kept[kept > 0].to_dict()
    report = (evaluated / "report.html").read_text()
    assert "quality control per well" in report and "n_blur" in report and "dropped before aggregating" in report


def test_measurements_see_blur_saturation_and_debris() -> None:
    rng = np.random.default_rng(0)
    field = np.full((2, 64, 64), 100.0, np.float32)
    yy, xx = np.mgrid[:64, :64]
    for cy, cx, r in ((16, 16, 6), (16, 48, 6), (48, 16, 6), (48, 48, 1.2)):  # the last one is a speck of debris
        field[0] += 3000 * (((yy - cy) ** 2 + (xx - cx) ** 2) <= r**2)
    field[1] += 500 * rng.random((64, 64)).astype(np.float32)
    sharp = field + rng.normal(0, 5, field.shape).astype(np.float32)
    blurred = gaussian_filter(field, sigma=(0, 2.5, 2.5)) + rng.normal(0, 5, field.shape).astype(np.float32)
    clipped = np.minimum(sharp * 4, 4095.0)  # a 12-bit camera at full scale
    centres = np.array([[16, 16], [16, 48], [48, 16], [48, 48]], np.float64)
    measured = {}
    for name, data in (("sharp", sharp), ("blurred", blurred), ("clipped", clipped)):
        crops = crop_cells(data, centres, 24).crops
        measured[name] = measure_cells(crops, saturation_levels(data), nuclear=0)
    assert (measured["blurred"]["focus"] < 0.5 * measured["sharp"]["focus"]).all()
    assert saturation_levels(clipped).tolist() == [4095.0, np.inf] and saturation_levels(sharp).tolist() == [np.inf] * 2
    assert (measured["clipped"]["saturated_fraction"][:3] > 0.1).all() and (
        measured["sharp"]["saturated_fraction"] == 0
    ).all()
    area = measured["sharp"]["nucleus_area"]
    assert 100 < area[0] < 130 and area[3] < 10  # a radius-6 disc is 113 pixels
    medians = plate_medians([("P", measured["sharp"])])
    flags = flag_cells(measured["sharp"], medians["P"], QcThresholds())
    assert flags["qc_debris"].tolist() == [False, False, False, True] and not flags["qc_blur"].any()


def test_profile_qc_on_a_run_without_flags_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import zarr

    run = tmp_path / "run"
    run.mkdir()
    zarr.open_group(run / "embeddings.zarr", mode="w").create_array("embeddings", shape=(2, 3), dtype="float32")
    pd.DataFrame({"plate": ["P", "P"], "well": ["A01", "A02"], "edge": [False, False]}).to_parquet(
        run / "cells.parquet"
    )
    platemap = tmp_path / "map.csv"
    platemap.write_text("plate,well,treatment,role\nP,A01,DMSO,negative_control\nP,A02,x,active\n")
    out = tmp_path / "p.parquet"
    assert main(["cells", "profile", str(run), "--platemap", str(platemap), "--out", str(out), "--qc"]) == 2
    err = capsys.readouterr().err
    assert "carry no QC flags (it was embedded before per-cell QC existed)" in err and not out.exists()
