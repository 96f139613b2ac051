"""Tests for bio.profiles and `dinoscope cells profile`: streaming aggregation, plate-map join, normalisation."""

from __future__ import annotations

import string
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

import bio.profiles_aggregate as aggregate_mod
import core.cli
from bio.evaluate_knn import batch_separation
from bio.profiles import feature_columns, normalise_well_names, read_profiles
from bio.profiles_aggregate import aggregate_wells
from bio.profiles_normalise import normalise_profiles, treatment_consensus
from bio.profiles_platemap import annotate_wells, read_platemap
from core.errors import DinoscopeError

TREATMENTS = {"active_a": "m1", "active_b": "m2", "inert_c": "none", "inert_d": "none"}


def make_run(
    root: Path,
    *,
    plates: tuple[str, ...] = ("P1", "P2", "P3"),
    n_controls: int = 4,
    replicates: int = 2,
    cells_per_well: int = 20,
    dim: int = 16,
    plate_offset: float = 4.0,
    chunk_rows: int = 37,
    shuffle: bool = False,
    dtype: str = "float32",
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write RUN/{embeddings.zarr, cells.parquet} and a plate map; actives shift cells, plates add an offset."""
    rng = np.random.default_rng(seed)
    effects = {t: (rng.normal(0, 1.5, dim) if t.startswith("active") else np.zeros(dim)) for t in TREATMENTS}
    cells, embs, layout = [], [], []
    for plate in plates:
        offset = rng.normal(0, plate_offset, dim)
        wells = [("DMSO", "negative_control", "")] * n_controls + [
            (t, "active" if t.startswith("active") else "inert", m) for t, m in TREATMENTS.items()
        ] * replicates
        for i, (treatment, role, moa) in enumerate(wells):
            well = f"{string.ascii_uppercase[i // 12]}{i % 12 + 1:02d}"
            layout.append({"plate": plate, "well": well, "treatment": treatment, "role": role, "moa": moa})
            embs.append(offset + effects.get(treatment, 0) + rng.normal(0, 1, (cells_per_well, dim)))
            cells.append(
                pd.DataFrame(
                    {
                        "plate": plate,
                        "well": well,
                        "site": np.arange(cells_per_well) % 4,
                        "cell_id": np.arange(cells_per_well),
                        "x": 1.0,
                        "y": 2.0,
                        "edge": np.arange(cells_per_well) % 5 == 0,
                    }
                )
            )
    table, emb = pd.concat(cells, ignore_index=True), np.concatenate(embs).astype(dtype)
    if shuffle:
        order = rng.permutation(len(table))
        table, emb = table.iloc[order].reset_index(drop=True), emb[order]
    run = root / "run"
    run.mkdir(parents=True)
    array = zarr.open_group(run / "embeddings.zarr", mode="w").create_array(
        "embeddings", shape=emb.shape, chunks=(chunk_rows, dim), dtype=dtype
    )
    array[:] = emb
    table.to_parquet(run / "cells.parquet", row_group_size=50)
    platemap = root / "platemap.csv"
    pd.DataFrame(layout).to_csv(platemap, index=False)
    return run, platemap


def _truth(run: Path, op: str, drop_edge: bool = False) -> pd.DataFrame:
    cells = pd.read_parquet(run / "cells.parquet")
    emb = np.asarray(zarr.open_group(run / "embeddings.zarr", mode="r")["embeddings"][:], np.float32)
    frame = pd.concat([cells[["plate", "well"]], pd.DataFrame(emb)], axis=1)
    if drop_edge:
        frame = frame[~cells["edge"]]
    return frame.groupby(["plate", "well"]).agg(op).sort_index()


@pytest.mark.parametrize("op", ["median", "mean"])
def test_streamed_aggregation_equals_in_memory_groupby(
    tmp_path: Path, op: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interleaved cells, tiny read batches and a tiny median budget (several passes) still give exact values."""
    run, _ = make_run(tmp_path, shuffle=True, dtype="float16")
    monkeypatch.setattr(aggregate_mod, "_BATCH_BYTES", 1)
    wells = aggregate_wells(run, operation=op, memory_budget_bytes=16 * 4 * 100)
    truth = _truth(run, op)
    assert len(wells) == len(truth) == 36
    np.testing.assert_allclose(wells[feature_columns(wells)].to_numpy(), truth.to_numpy(), rtol=1e-5, atol=1e-5)
    assert (wells["Metadata_n_cells"] == 20).all()
    assert feature_columns(wells) == [f"emb_{j}" for j in range(16)]


def test_drop_edge_cells_excludes_flagged_cells(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path)
    wells = aggregate_wells(run, operation="median", drop_edge_cells=True)
    assert (wells["Metadata_n_cells"] == 16).all()
    np.testing.assert_allclose(
        wells[feature_columns(wells)].to_numpy(), _truth(run, "median", True).to_numpy(), rtol=1e-5, atol=1e-5
    )


def test_median_pass_plan_is_one_pass_for_sorted_runs_and_bounded_otherwise() -> None:
    sorted_wells = pd.DataFrame({"count": [10] * 50, "first": np.arange(50) * 10, "last": np.arange(50) * 10 + 9})
    assert len(aggregate_mod._plan_median_passes(sorted_wells, budget_cells=10)) == 1
    interleaved = pd.DataFrame({"count": [10] * 50, "first": np.arange(50), "last": 450 + np.arange(50)})
    groups = aggregate_mod._plan_median_passes(interleaved, budget_cells=100)
    assert len(groups) == 5 and sorted(np.concatenate(groups).tolist()) == list(range(50))
    assert all(interleaved["count"].to_numpy()[g].sum() <= 100 for g in groups)


def test_aggregation_memory_stays_below_the_embedding_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = make_run(tmp_path, cells_per_well=800, dim=64, chunk_rows=1024)  # 28,800 cells, 7.4 MB float32
    monkeypatch.setattr(aggregate_mod, "_BATCH_BYTES", 2**18)
    full_bytes = 28_800 * 64 * 4
    for op in ("median", "mean"):
        tracemalloc.start()
        aggregate_wells(run, operation=op)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < full_bytes / 2, (op, peak)


def test_well_names_match_whatever_the_zero_padding() -> None:
    assert normalise_well_names(pd.Series(["a1", "A01", "B012", " c7 ", "odd"])).tolist() == [
        "A01",
        "A01",
        "B12",
        "C07",
        "odd",
    ]


def test_platemap_join_uses_jump_spelling_and_refuses_unmapped_wells_unless_allowed(tmp_path: Path) -> None:
    run, platemap_path = make_run(tmp_path)
    platemap = read_platemap(platemap_path)
    platemap = platemap[platemap["Metadata_Well"] != "A01"]
    platemap["Metadata_Well"] = platemap["Metadata_Well"].str.replace("0", "", n=1)  # "A02" -> "A2"
    wells = aggregate_wells(run)
    with pytest.raises(DinoscopeError, match=r"3 well\(s\) of the run are not in the plate map") as err:
        annotate_wells(wells, platemap)
    assert "P1/A10, P2/A10, P3/A10" in err.value.message and "--allow-missing-wells" in err.value.fix  # A10 became A1
    profiles, missing = annotate_wells(wells, platemap, allow_missing_wells=True)
    assert len(profiles) == 36 - 3
    assert missing == {"not_in_platemap": ["P1/A10", "P2/A10", "P3/A10"], "without_cells": []}
    assert {"Metadata_Plate", "Metadata_Well", "Metadata_treatment", "Metadata_role", "Metadata_moa"} <= set(
        profiles.columns
    )
    assert profiles.columns[-1] == "emb_15"
    full = read_platemap(platemap_path)
    extra = pd.concat([full, full.iloc[:1].assign(Metadata_Well="H12")])  # a mapped well without cells
    with pytest.raises(
        DinoscopeError, match=r"\] 1 plate-map well\(s\) have no cell in the run \(without cells: P1/H12\)"
    ):
        annotate_wells(wells, extra)


@pytest.mark.parametrize(
    "content, field",
    [
        ("plate,well,treatment\nP1,A01,DMSO\n", "role"),
        ("plate,Metadata_Plate,well,treatment,role\nP1,P1,A01,DMSO,x\n", "Metadata_Plate"),
        ("plate,well,treatment,role\nP1,A01,DMSO,negative_control\nP1,A1,x,active\n", "well"),
    ],
)
def test_bad_platemap_raises_with_field(tmp_path: Path, content: str, field: str) -> None:
    path = tmp_path / "map.csv"
    path.write_text(content)
    with pytest.raises(DinoscopeError) as err:
        read_platemap(path)
    assert err.value.field == field and str(path) in str(err.value)


def test_normalisation_removes_injected_plate_offset(tmp_path: Path) -> None:
    run, platemap = make_run(tmp_path, plate_offset=4.0)
    raw = annotate_wells(aggregate_wells(run), read_platemap(platemap))[0]
    before = batch_separation(raw)
    normalised = normalise_profiles(raw, method="mad_robustize")
    after = batch_separation(normalised)
    assert before["silhouette"] > 0.5 and before["knn_accuracy"] == 1.0
    assert after["silhouette"] < 0.1 and after["knn_accuracy"] < 0.7
    controls = normalised[normalised["Metadata_role"] == "negative_control"]
    medians = controls.groupby("Metadata_Plate")[feature_columns(controls)].median().to_numpy()
    np.testing.assert_allclose(medians, 0, atol=1e-5)


def test_spherize_whitens_the_controls(tmp_path: Path) -> None:
    run, platemap = make_run(tmp_path, n_controls=12, dim=6)
    raw = annotate_wells(aggregate_wells(run), read_platemap(platemap))[0]
    out = normalise_profiles(raw, method="spherize", by=None)
    ctrl = out.loc[out["Metadata_role"] == "negative_control", feature_columns(out)].to_numpy(np.float64)
    np.testing.assert_allclose(np.cov(ctrl, rowvar=False), np.eye(6), atol=1e-3)


def test_plate_with_too_few_controls_is_a_user_error(tmp_path: Path) -> None:
    run, platemap = make_run(tmp_path, n_controls=1)
    raw = annotate_wells(aggregate_wells(run), read_platemap(platemap))[0]
    with pytest.raises(DinoscopeError, match="plate 'P1' has 1 control"):
        normalise_profiles(raw)


def test_treatment_consensus_has_one_row_per_treatment(tmp_path: Path) -> None:
    run, platemap = make_run(tmp_path)
    wells = normalise_profiles(annotate_wells(aggregate_wells(run), read_platemap(platemap))[0])
    cons = treatment_consensus(wells)
    assert sorted(cons["Metadata_treatment"]) == sorted(["DMSO", *TREATMENTS])
    assert "Metadata_Plate" not in cons.columns and "Metadata_moa" in cons.columns
    row = cons.set_index("Metadata_treatment").loc["active_a"]
    assert row["Metadata_n_wells"] == 6 and row["Metadata_n_cells"] == 120
    expected = wells[wells["Metadata_treatment"] == "active_a"][feature_columns(wells)].median()
    np.testing.assert_allclose(row[feature_columns(cons)].to_numpy(float), expected.to_numpy(), rtol=1e-5)


@pytest.fixture
def cli() -> object:
    """`core.cli.main`: the whole ``dinoscope`` command line."""
    return core.cli.main


def test_cli_profile_writes_well_and_treatment_parquet(tmp_path: Path, cli: object) -> None:
    run, platemap = make_run(tmp_path)
    out = tmp_path / "out" / "profiles.parquet"
    assert cli(["cells", "profile", str(run), "--platemap", str(platemap), "--out", str(out)]) == 0
    profiles, provenance = read_profiles(out)
    assert len(profiles) == 36 and feature_columns(profiles) == [f"emb_{j}" for j in range(16)]
    assert all(c.startswith("Metadata_") for c in profiles.columns if not c.startswith("emb_"))
    separation = provenance["batch_separation"]
    assert separation["after_normalisation"]["silhouette"] < separation["before_normalisation"]["silhouette"]
    assert provenance["aggregate"] == "median" and provenance["n_cells"] == 720
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]  # no temp file left behind

    cons = tmp_path / "cons.parquet"
    assert (
        cli(
            [
                "cells",
                "profile",
                str(run),
                "--platemap",
                str(platemap),
                "--out",
                str(cons),
                "--level",
                "treatment",
                "--aggregate",
                "mean",
                "--normalise",
                "standardize",
            ]
        )
        == 0
    )
    assert len(read_profiles(cons)[0]) == 5


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_embeddings", "embeddings.zarr"),
        ("no_controls", "no well has role == 'negative_control'"),
        ("missing_column", "plate map lacks column(s) ['role']"),
        ("row_mismatch", "cells.parquet has 719 rows but embeddings has 720"),
        ("unknown_wells", "no well of the run is in the plate map"),
    ],
)
def test_cli_profile_bad_input_exits_2(
    tmp_path: Path, cli: object, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    run, platemap = make_run(tmp_path)
    table = pd.read_csv(platemap)
    if case == "no_embeddings":
        import shutil

        shutil.rmtree(run / "embeddings.zarr")
    elif case == "no_controls":
        table.loc[table["role"] == "negative_control", "role"] = "inert"
    elif case == "missing_column":
        table = table.drop(columns="role")
    elif case == "row_mismatch":
        pd.read_parquet(run / "cells.parquet").iloc[:-1].to_parquet(run / "cells.parquet")
    elif case == "unknown_wells":
        table["plate"] = "other_" + table["plate"]
    table.to_csv(platemap, index=False)
    out = tmp_path / "p.parquet"
    assert cli(["cells", "profile", str(run), "--platemap", str(platemap), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()
