"""A screen as JUMP and CellProfiler store it goes through `cells profile`, `cells evaluate` and `cells fit-head`:
a ``Metadata_``-prefixed plate map driven by the column flags, evaluation reading the settings `cells profile`
stored, JUMP-spelled output that pycytominer aggregates, a hit list that calls no hit from two replicates, and
plate-map wells that are missing stopping the run unless allowed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import zarr
from pycytominer import aggregate
from pycytominer.cyto_utils import infer_cp_features

from bio.profiles import read_profiles, write_profiles
from core.cli import main

DIM = 12
# (pert_iname, replicate wells per plate, effect size, MoA, direction); two plates double the replicates
COMPOUNDS = [
    ("strong_a", 2, 3.0, "moa_ab", "u"),
    ("strong_b", 2, 3.0, "moa_ab", "u"),
    ("strong_e", 2, 3.0, "moa_e", "v"),
    ("inert_c", 2, 0.0, "moa_c", "w"),
    ("duo_d", 1, 3.0, "moa_d", "x"),
]
N_WELLS = 8 + sum(c[1] for c in COMPOUNDS)  # per plate


def _jump_run(root: Path, n_controls: int = 8, cells: int = 12) -> tuple[Path, Path]:
    """An embedding run of two plates and its JUMP-style plate map (negcon DMSO, blank control type elsewhere)."""
    rng = np.random.default_rng(7)
    directions = {key: rng.normal(0, 1, DIM) for key in "uvwx"}
    table, embs, rows = [], [], []
    for plate in ("BR001", "BR002"):
        layout = [("DMSO", "negcon", "", 0.0, "u")] * n_controls
        layout += [(name, "", moa, effect, d) for name, reps, effect, moa, d in COMPOUNDS for _ in range(reps)]
        for i, (pert, control, moa, effect, d) in enumerate(layout):
            well = f"{'ABCDEFGH'[i // 12]}{i % 12 + 1:02d}"
            shift = effect * directions[d] / np.linalg.norm(directions[d]) + rng.normal(0, 0.3, DIM)
            embs.append(shift + rng.normal(0, 0.4, (cells, DIM)))
            table.append(pd.DataFrame({"plate": plate, "well": well, "site": "1", "edge": False}, index=range(cells)))
            rows.append(
                {
                    "Metadata_Plate": plate,
                    "Metadata_Well": well,
                    "Metadata_pert_iname": pert,
                    "Metadata_control_type": control,
                    "Metadata_moa": moa,
                }
            )
    run = root / "run"
    run.mkdir()
    emb = np.concatenate(embs).astype(np.float32)
    group = zarr.open_group(run / "embeddings.zarr", mode="w")
    group.create_array("embeddings", shape=emb.shape, chunks=(64, DIM), dtype="float32")[:] = emb
    pd.concat(table, ignore_index=True).assign(cell_id=1, x=1.0, y=1.0).to_parquet(run / "cells.parquet")
    platemap = root / "platemap.csv"
    pd.DataFrame(rows).to_csv(platemap, index=False)
    return run, platemap


JUMP_FLAGS = [
    "--treatment-column",
    "Metadata_pert_iname",
    "--control-column",
    "Metadata_control_type",
    "--control-value",
    "negcon",
]


def test_a_jump_plate_map_drives_profile_and_evaluate_through_the_column_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run, platemap = _jump_run(tmp_path)
    profiles = tmp_path / "profiles.parquet"
    argv = ["cells", "profile", str(run), "--platemap", str(platemap), "--out", str(profiles)]
    assert main([*argv, "--feature-prefix", "Cells_DINO_", *JUMP_FLAGS]) == 0
    raw = pq.read_table(profiles).to_pandas()
    meta = [c for c in raw.columns if c.startswith("Metadata_")]
    assert meta[:2] == ["Metadata_Plate", "Metadata_Well"] and "Metadata_pert_iname" in meta
    features = [c for c in raw.columns if not c.startswith("Metadata_")]
    assert features == [f"Cells_DINO_{j}" for j in range(DIM)]
    assert infer_cp_features(raw) == features  # pycytominer finds the embedding by itself
    per_compound = aggregate(raw, strata=["Metadata_Plate", "Metadata_pert_iname"], features="infer")
    assert len(per_compound) == 2 * 6 and list(per_compound.columns[2:]) == features
    expected = raw[raw["Metadata_pert_iname"] == "strong_a"].groupby("Metadata_Plate")[features].median()
    got = per_compound[per_compound["Metadata_pert_iname"] == "strong_a"].set_index("Metadata_Plate")[features]
    np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), rtol=1e-5)
    stored = read_profiles(profiles)[1]
    assert stored["treatment_column"] == "Metadata_pert_iname" and stored["control_value"] == "negcon"
    assert stored["feature_prefix"] == "Cells_DINO_"

    out = tmp_path / "eval"  # no column flags: evaluate uses what `cells profile` stored
    evaluate = ["cells", "evaluate", str(profiles), "--out", str(out), "--annotation-column", "Metadata_moa"]
    assert main([*evaluate, "--null-size", "2000"]) == 0
    assert "treatments in Metadata_pert_iname, controls where Metadata_control_type == 'negcon'" in (
        capsys.readouterr().err
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["from"] == dict.fromkeys(
        ("treatment_column", "control_column", "control_value"), "profiles"
    )
    activity = pd.read_csv(out / "activity.csv", keep_default_na=False)
    assert list(activity.columns[:6]) == [
        "treatment",
        "n_replicates",
        "mean_average_precision",
        "p_value",
        "corrected_p_value",
        "below_corrected_p",
    ]
    assert activity["corrected_p_value"].is_monotonic_increasing and len(activity) == 5
    by = activity.set_index("treatment")
    assert by.loc[["strong_a", "strong_b", "strong_e"], "hit"].all() and not by.loc["inert_c", "hit"]
    # two replicates (one per plate): flagged and not a hit, whatever copairs' q-value says
    assert by.loc["duo_d", "n_replicates"] == 2 and not by.loc["duo_d", "hit"]
    assert by.loc["duo_d", "flag"] == "fewer than 3 replicates: not called a hit" and by.loc["strong_a", "flag"] == ""
    consistency = pd.read_csv(out / "consistency.csv")
    assert list(consistency.columns[:3]) == ["annotation", "n_treatments", "mean_average_precision"]
    assert consistency.set_index("annotation").loc["moa_ab", "n_treatments"] == 2  # hits only (copairs' recipe)
    assert "moa_c" not in set(consistency["annotation"]) and "moa_d" not in set(consistency["annotation"])
    report = (out / "report.html").read_text()
    assert "duo_d" in report and "fewer than 3 replicates" in report

    assert main([*evaluate, "--null-size", "2000", "--min-replicates", "2", "--overwrite"]) == 0
    relaxed = pd.read_csv(out / "activity.csv", keep_default_na=False).set_index("treatment")
    assert (
        relaxed.loc["duo_d", "flag"] == "" and relaxed.loc["duo_d", "hit"] == relaxed.loc["duo_d", "below_corrected_p"]
    )


def test_fit_head_takes_a_jump_label_and_bad_columns_name_what_the_map_has(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run, platemap = _jump_run(tmp_path)
    argv = ["cells", "fit-head", str(run), "--platemap", str(platemap), "--out", str(tmp_path / "head")]
    assert main([*argv, "--label", "Metadata_pert_iname", "--epochs", "3"]) == 0
    assert json.loads((tmp_path / "head" / "head.json").read_text())["classes"][0] == "DMSO"
    assert main([*argv, "--label", "pert_iname", "--epochs", "3", "--overwrite"]) == 0  # the prefix may be left out
    profile = ["cells", "profile", str(run), "--platemap", str(platemap), "--out", str(tmp_path / "p.parquet")]
    assert main([*profile, "--treatment-column", "Metadata_Pert_Iname"]) == 2
    err = capsys.readouterr().err
    assert "plate map lacks column(s) ['Metadata_Pert_Iname', 'role'] (did you mean 'Metadata_pert_iname'?)" in err
    assert "Metadata_control_type" in err and not (tmp_path / "p.parquet").exists()


def test_plate_map_wells_that_are_missing_stop_profile_and_fit_head_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run, platemap = _jump_run(tmp_path)
    table = pd.read_csv(platemap, dtype=str, keep_default_na=False)
    table[~((table["Metadata_Plate"] == "BR002") & (table["Metadata_Well"] == "A07"))].to_csv(platemap, index=False)
    out = tmp_path / "p.parquet"
    profile = ["cells", "profile", str(run), "--platemap", str(platemap), "--out", str(out), *JUMP_FLAGS]
    assert main(profile) == 2
    err = capsys.readouterr().err
    assert "1 well(s) of the run are not in the plate map (not in platemap: BR002/A07)" in err
    assert "--allow-missing-wells" in err and not out.exists()
    head = ["cells", "fit-head", str(run), "--platemap", str(platemap), "--label", "Metadata_pert_iname"]
    assert main([*head, "--out", str(tmp_path / "head"), "--epochs", "2"]) == 2
    assert "1 well(s) of the run are not in the plate map: BR002/A07" in capsys.readouterr().err
    assert main([*profile, "--allow-missing-wells"]) == 0
    profiles, provenance = read_profiles(out)
    assert len(profiles) == 2 * N_WELLS - 1 and provenance["missing_wells"]["not_in_platemap"] == ["BR002/A07"]


def test_profiles_written_before_the_jump_spelling_still_evaluate(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    old = pd.DataFrame(
        {
            "Metadata_plate": np.repeat(["P1", "P2"], 8),
            "Metadata_well": [f"A{i:02d}" for i in range(1, 17)],
            "Metadata_treatment": (["DMSO"] * 4 + ["x"] * 4) * 2,
            "Metadata_role": (["negative_control"] * 4 + ["active"] * 4) * 2,
        }
    )
    feats = pd.DataFrame(rng.normal(size=(16, 4)).astype(np.float32), columns=[f"emb_{j}" for j in range(4)])
    path = tmp_path / "old.parquet"
    write_profiles(pd.concat([old, feats], axis=1), path)
    profiles, _ = read_profiles(path)
    assert {"Metadata_Plate", "Metadata_Well"} <= set(profiles.columns) and "Metadata_plate" not in profiles.columns
    assert main(["cells", "evaluate", str(path), "--out", str(tmp_path / "e"), "--null-size", "100"]) == 0
