"""Tests for bio.evaluate and `dinoscope cells evaluate`: copairs mAP, chunked kNN, batch separation, report."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import bio.evaluate_knn as knn_mod
import core.cli
from bio.evaluate_knn import batch_separation, knn_classify, knn_metrics, nearest_neighbours
from bio.evaluate_map import phenotypic_activity, phenotypic_consistency
from bio.profiles import write_profiles
from core.errors import DinoscopeError

NULL_SIZE = 2000


def make_profiles(
    *,
    n_plates: int = 4,
    n_controls: int = 6,
    replicates: int = 2,
    dim: int = 24,
    plate_offset: float = 0.0,
    noise: float = 1.0,
    moa: dict[str, str] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Well profiles: three actives (two share MoA m1 and a direction), two inert treatments, DMSO controls."""
    rng = np.random.default_rng(seed)
    u, w, v = (rng.normal(0, 1, dim) for _ in range(3))
    u, w, v = (x / np.linalg.norm(x) * 4.0 for x in (u, w, v))
    effects = {"active_1": u, "active_2": 0.8 * u + 0.6 * w, "active_3": v, "inert_1": 0 * u, "inert_2": 0 * u}
    moa = moa or {"active_1": "m1", "active_2": "m1", "active_3": "m2", "inert_1": "m3", "inert_2": "m3"}
    rows, feats = [], []
    for p in range(n_plates):
        offset = rng.normal(0, plate_offset, dim)
        layout = [("DMSO", "negative_control")] * n_controls + [
            (t, "active" if t.startswith("active") else "inert") for t in effects
        ] * replicates
        for i, (treatment, role) in enumerate(layout):
            rows.append(
                {
                    "Metadata_Plate": f"P{p}",
                    "Metadata_Well": f"W{i:02d}",
                    "Metadata_treatment": treatment,
                    "Metadata_role": role,
                    "Metadata_moa": moa.get(treatment, ""),
                }
            )
            feats.append(offset + effects.get(treatment, 0) + rng.normal(0, noise, dim))
    emb = pd.DataFrame(np.asarray(feats, np.float32), columns=[f"emb_{j}" for j in range(dim)])
    return pd.concat([pd.DataFrame(rows), emb], axis=1)


def _by_label(section: dict) -> dict[str, dict]:
    return {row["label"]: row for row in section["per_label"]}


def test_active_treatments_score_clearly_higher_activity_map_than_inert() -> None:
    result = phenotypic_activity(make_profiles(), null_size=NULL_SIZE)
    rows = _by_label(result)
    assert set(rows) == {"active_1", "active_2", "active_3", "inert_1", "inert_2"}
    active = [rows[t]["mean_average_precision"] for t in ("active_1", "active_2", "active_3")]
    inert = [rows[t]["mean_average_precision"] for t in ("inert_1", "inert_2")]
    assert min(active) > 0.9 and max(inert) < 0.75 and min(active) - max(inert) > 0.25
    assert all(rows[t]["below_corrected_p"] for t in ("active_1", "active_2", "active_3"))
    assert not any(rows[t]["below_corrected_p"] for t in ("inert_1", "inert_2"))
    assert result["fraction_retrieved"] == pytest.approx(0.6)
    assert rows["active_1"]["n_replicates"] == 8 and result["negatives_matched_by"] == "Metadata_Plate"


def test_consistency_retrieves_treatments_sharing_an_annotation() -> None:
    profiles = make_profiles()
    result = phenotypic_consistency(profiles, ["active_1", "active_2", "active_3"], null_size=NULL_SIZE)
    assert result["n_treatments"] == 3 and result["active_only"]
    assert _by_label(result)["m1"]["mean_average_precision"] == pytest.approx(1.0)

    multi = make_profiles(moa={"active_1": "m1|m9", "active_2": "m1", "active_3": "m2|m9"})
    result = phenotypic_consistency(multi, ["active_1", "active_2", "active_3"], null_size=NULL_SIZE)
    assert {"m1", "m9"} <= set(_by_label(result))

    skipped = phenotypic_consistency(profiles, ["active_1"], null_size=NULL_SIZE)
    assert "skipped" in skipped


def test_nearest_neighbours_in_chunks_match_dense_search_and_respect_exclusions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(300, 8)).astype(np.float32)
    plates = rng.integers(0, 4, 300)
    monkeypatch.setattr(knn_mod, "_NEIGHBOUR_BLOCK", 1000)  # 3 query rows per chunk
    rows, nbrs = nearest_neighbours(feats, 3, exclude_same=[plates])
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sims = unit @ unit.T
    sims[plates[:, None] == plates[None, :]] = -np.inf
    np.testing.assert_array_equal(rows, np.arange(300))
    np.testing.assert_array_equal(nbrs, np.argsort(-sims, axis=1, kind="stable")[:, :3])
    assert (plates[nbrs] != plates[:, None]).all()


def test_knn_classify_reports_accuracy_and_macro_f1() -> None:
    feats = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.8, 0.2]], np.float32)
    labels = np.array(["a", "a", "b", "b", "b"])
    result = knn_classify(feats, labels, k=1)
    # 1-NN with self excluded predicts a, a, b, b, a: row 4 ([0.8, 0.2]) is nearest to row 1 ([0.9, 0.1])
    assert result["n_queries"] == 5 and result["accuracy"] == pytest.approx(4 / 5)
    # class a: precision 2/3, recall 1 -> F1 0.8; class b: precision 1, recall 2/3 -> F1 0.8
    assert result["macro_f1"] == pytest.approx(0.8)
    # 3-NN majority votes: b, b, b, b, a (the two a rows are outvoted by b neighbours)
    assert knn_classify(feats, labels, k=3)["accuracy"] == pytest.approx(2 / 5)
    lonely = knn_classify(feats, labels, exclude_same=[np.zeros(5, int)])
    assert lonely["n_without_neighbour"] == 5 and lonely["accuracy"] is None


def test_knn_metrics_use_not_same_batch_and_not_same_compound_holdouts() -> None:
    result = knn_metrics(make_profiles(plate_offset=0.3, noise=0.3), k=1)
    assert set(result) == {"treatment_nsb", "moa_nsc", "moa_nscb"}
    # actives are found on other plates; the two inert treatments are indistinguishable (half right): ~0.8
    assert result["treatment_nsb"]["n_queries"] == 40 and result["treatment_nsb"]["accuracy"] > 0.65
    assert result["moa_nsc"]["accuracy"] > 0.5 and 0 < result["moa_nscb"]["macro_f1"] <= 1


def test_chunked_knn_memory_stays_far_below_a_dense_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    n = 4000
    feats = np.random.default_rng(0).normal(size=(n, 16)).astype(np.float32)
    monkeypatch.setattr(knn_mod, "_NEIGHBOUR_BLOCK", 2**18)
    tracemalloc.start()
    nearest_neighbours(feats, 5, exclude_same=[np.arange(n) % 7])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < n * n * 4 / 8  # the dense float32 similarity matrix alone would be 64 MB


def test_batch_separation_drops_with_offset_and_is_not_applicable_without_enough_controls() -> None:
    shifted = batch_separation(make_profiles(plate_offset=3.0))
    clean = batch_separation(make_profiles(plate_offset=0.0))
    assert shifted["silhouette"] > 0.5 > clean["silhouette"] and shifted["knn_accuracy"] == 1.0
    assert clean["knn_accuracy"] < 0.6 and clean["chance_accuracy"] == pytest.approx(0.25)
    single = batch_separation(make_profiles(n_plates=1))
    assert "1 batch(es)" in single["not_applicable"] and "knn_accuracy" not in single
    # the case: k = 5 on 4 control wells of 2 plates reported 0.0 against a chance of 0.5
    few = batch_separation(make_profiles(n_plates=2, n_controls=2, plate_offset=3.0), k=5)
    assert few["n_control_wells"] == 4 and "knn_accuracy" not in few and "silhouette" not in few
    assert "k=5 needs more than 5 neighbours, but each of the 4 control wells has 3" in few["not_applicable"]
    assert batch_separation(make_profiles(n_plates=2, n_controls=2, plate_offset=3.0), k=2)["knn_accuracy"] == 1.0


@pytest.fixture
def cli() -> object:
    """`core.cli.main`: the whole ``dinoscope`` command line."""
    return core.cli.main


def _strict_json(path: Path) -> dict:
    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=reject)


def test_cli_evaluate_writes_metrics_figures_and_report(tmp_path: Path, cli: object) -> None:
    path = tmp_path / "profiles.parquet"
    before = {"batch_separation": {"before_normalisation": {"silhouette": 0.9}}}
    write_profiles(make_profiles(), path, provenance=before)
    out = tmp_path / "eval"
    assert cli(["cells", "evaluate", str(path), "--out", str(out), "--null-size", str(NULL_SIZE)]) == 0
    metrics = _strict_json(out / "metrics.json")
    assert metrics["activity"]["fraction_retrieved"] == pytest.approx(0.6)
    assert _by_label(metrics["consistency"])["m1"]["mean_average_precision"] == pytest.approx(1.0)
    assert metrics["knn"]["treatment_nsb"]["k"] == 1 and "macro_f1" in metrics["knn"]["moa_nsc"]
    assert metrics["batch_separation"]["before_normalisation"]["silhouette"] == 0.9
    assert "silhouette" in metrics["batch_separation"]["profiles"]
    assert metrics["figures"] == {
        "pca": "pca.png",
        "activity_map": "activity_map.png",
        "consistency_map": "consistency_map.png",
    }
    for name in metrics["figures"].values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 3 and "active_1" in report and "fraction retrieved" in report


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_file", "cannot read profiles"),
        ("no_treatment", "profiles have no column 'Metadata_treatment'"),
        ("no_controls", "no profile has role == 'negative_control'"),
    ],
)
def test_cli_evaluate_bad_input_exits_2(
    tmp_path: Path, cli: object, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    profiles = make_profiles(n_plates=2)
    if case == "no_treatment":
        profiles = profiles.drop(columns="Metadata_treatment")
    elif case == "no_controls":
        profiles["Metadata_role"] = "inert"
    path = tmp_path / "profiles.parquet"
    if case != "missing_file":
        write_profiles(profiles, path)
    assert cli(["cells", "evaluate", str(path), "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_activity_rejects_missing_treatment_names() -> None:
    profiles = make_profiles(n_plates=2)
    profiles.loc[7, "Metadata_treatment"] = None
    with pytest.raises(DinoscopeError, match="missing treatment"):
        phenotypic_activity(profiles, null_size=100)


def test_treatment_level_profiles_skip_replicate_metrics_but_score_consistency(tmp_path: Path) -> None:
    from bio.evaluate import evaluate_profiles
    from bio.profiles_normalise import treatment_consensus

    path = tmp_path / "consensus.parquet"
    write_profiles(treatment_consensus(make_profiles(noise=0.3)), path)
    metrics = evaluate_profiles(path, tmp_path / "eval", null_size=NULL_SIZE, plots=False)
    assert "skipped" in metrics["activity"] and "skipped" in metrics["knn"]["treatment_nsb"]
    assert "no batch column Metadata_Plate" in metrics["batch_separation"]["profiles"]["not_applicable"]
    assert metrics["consistency"]["active_only"] is False and metrics["consistency"]["n_treatments"] == 5
    assert _by_label(metrics["consistency"])["m1"]["mean_average_precision"] == pytest.approx(1.0)
    assert (tmp_path / "eval" / "metrics.json").exists() and not (tmp_path / "eval" / "report.html").exists()
