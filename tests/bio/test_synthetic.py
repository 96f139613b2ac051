"""Synthetic Cell Painting plates: determinism, layout, ground truth, treatment effects; illumination correction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bio import io
from bio.cells import centroids_from_table, detect_nuclei, match_centroids
from bio.preprocess import apply_illumination, estimate_illumination, load_illumination, save_illumination
from bio.synthetic import CHANNELS, TREATMENTS, make_plate
from core.errors import DinoscopeError


@pytest.fixture(scope="module")
def screen(tmp_path_factory: pytest.TempPathFactory) -> object:
    """The 'small plate' of the brief: 2 plates x 4 x 6 wells x 2 fields of 128 x 128 (about 2 s on 2 cores)."""
    return make_plate(tmp_path_factory.mktemp("screen"), n_rows=4, n_cols=6, fields=2, size=128, seed=0, plates=2)


@pytest.fixture(scope="module")
def tables(screen: object) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_csv(screen.platemap), pd.read_csv(screen.nuclei)


def _treatment_of(platemap: pd.DataFrame, plate: str, row: str, column: str) -> str:
    hit = platemap[(platemap.plate == plate) & (platemap.well == io.well_name(row, column))]
    return hit.treatment.item()


def test_same_seed_gives_identical_plates_and_other_seeds_differ(tmp_path: Path) -> None:
    options = {"n_rows": 3, "n_cols": 3, "fields": 1, "size": 64, "plates": 1}
    first, again = make_plate(tmp_path / "a", seed=3, **options), make_plate(tmp_path / "b", seed=3, **options)
    other = make_plate(tmp_path / "c", seed=4, **options)
    assert first.platemap.read_text() == again.platemap.read_text()
    assert first.nuclei.read_text() == again.nuclei.read_text()
    assert first.nuclei.read_text() != other.nuclei.read_text()
    pixels = [[im.read() for *_, im in io.iter_fields(s.plates[0])] for s in (first, again, other)]
    for a, b, c in zip(*pixels, strict=False):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_plates_are_ngff_with_cell_painting_channels(screen: object, tmp_path: Path) -> None:
    assert [p.name for p in screen.plates] == ["plate1.ome.zarr", "plate2.ome.zarr"]
    layout = io.plate_layout(screen.plates[0])
    assert layout.version == "0.5" and layout.name == "plate1"
    assert layout.rows == list("ABCD") and layout.columns == [str(c) for c in range(1, 7)] and layout.n_fields == 48
    row, column, field, image = next(io.iter_fields(screen.plates[1]))
    assert image.channel_names == list(CHANNELS) == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert image.dtype == np.uint16 and image.shape == (5, 128, 128) and (row, column, field) == ("A", "1", "0")
    old = make_plate(tmp_path, n_rows=3, n_cols=3, fields=1, size=64, plates=1, version="0.4")
    assert json.loads((old.plates[0] / ".zattrs").read_text())["plate"]["version"] == "0.4"


def test_platemap_roles_and_controls_on_every_plate(tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    platemap, _ = tables
    assert list(platemap.columns) == ["plate", "well", "treatment", "role"]
    assert len(platemap) == 48 and not platemap.duplicated(["plate", "well"]).any()
    for treatment, role in zip(platemap.treatment, platemap.role, strict=False):
        assert TREATMENTS[treatment].role == role
    assert set(platemap.role) == {"negative_control", "active", "inert"}
    per_plate = platemap.groupby("plate").treatment
    assert (per_plate.apply(lambda t: (t == "DMSO").sum()) >= 2).all()
    assert (per_plate.nunique() == len(TREATMENTS)).all()  # every treatment on every plate
    inert = [name for name, t in TREATMENTS.items() if t.role == "inert"]
    assert len(inert) >= 2 and all(TREATMENTS[name].phenotype == TREATMENTS["DMSO"].phenotype for name in inert)


def test_nuclei_table_centroids_land_on_nuclei(screen: object, tables: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    _, nuclei = tables
    assert list(nuclei.columns)[:3] == ["plate", "well", "site"]
    recalls = []
    for row, column, field, image in io.iter_fields(screen.plates[0]):
        truth = centroids_from_table(nuclei, plate="plate1", well=io.well_name(row, column), site=field)
        dna = image.channel("DNA").astype(np.float32)
        at_centre = dna[tuple(np.floor(truth + 0.5).astype(int).T)]
        assert len(truth) >= 5 and (at_centre > 4 * np.median(dna)).all()
        recalls.append(match_centroids(detect_nuclei(dna), truth, max_distance=3.0).recall)
    assert np.mean(recalls) > 0.95


def test_treatments_shift_their_feature_and_inert_ones_do_not(
    screen: object, tables: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    platemap, _ = tables
    per_treatment: dict[str, dict[str, list[float]]] = {}
    for row, column, _, image in io.iter_fields(screen.plates[0], ["DNA", "ER"]):
        dna, er = image.read().astype(np.float32)
        _, labels = detect_nuclei(dna, return_labels=True)
        features = per_treatment.setdefault(_treatment_of(platemap, "plate1", row, column), {"area": [], "er": []})
        features["area"].append(float(np.median(np.bincount(labels.ravel())[1:])))
        features["er"].append(float(er.mean()))
    mean = {t: {k: np.mean(v) for k, v in f.items()} for t, f in per_treatment.items()}
    assert mean["nucleus_enlarger"]["area"] > 1.4 * mean["DMSO"]["area"]  # radius x1.35 -> area x1.8
    assert mean["er_stressor"]["er"] > 1.3 * mean["DMSO"]["er"]
    for inert in ("inert_a", "inert_b"):
        assert mean[inert]["area"] == pytest.approx(mean["DMSO"]["area"], rel=0.1)
        assert mean[inert]["er"] == pytest.approx(mean["DMSO"]["er"], rel=0.1)


def test_plates_differ_by_batch_effects_and_illumination_correction_removes_the_gradient(
    screen: object, tables: tuple[pd.DataFrame, pd.DataFrame], tmp_path: Path
) -> None:
    _, nuclei = tables
    flats = {}
    for plate_path in screen.plates:
        train = [image for *_, field, image in io.iter_fields(plate_path) if field == "0"]
        flats[plate_path.name] = estimate_illumination(train, "DNA", sigma=20)
    flat = flats["plate1.ome.zarr"]
    assert flat.shape == (128, 128) and flat.mean() == pytest.approx(1.0, abs=1e-5)
    assert np.abs(flat - flats["plate2.ome.zarr"]).max() > 0.05  # each plate has its own illumination
    # held-out fields (site 1): nucleus brightness follows the illumination before correction, much less after
    before, after, at_flat = [], [], []
    for row, column, field, image in io.iter_fields(screen.plates[0], ["DNA"]):
        if field != "1":
            continue
        truth = centroids_from_table(nuclei, plate="plate1", well=io.well_name(row, column), site=field)
        where = tuple(np.floor(truth + 0.5).astype(int).T)
        dna = image.read()[0]
        before += list(dna[where])
        after += list(apply_illumination(dna, flat)[where])
        at_flat += list(flat[where])
    corr_before, corr_after = np.corrcoef(before, at_flat)[0, 1], np.corrcoef(after, at_flat)[0, 1]
    # measured: 0.44 before, 0.18 after
    assert corr_before > 0.3 and abs(corr_after) < corr_before / 2
    saved = save_illumination(tmp_path / "illum.npz", {"DNA": flat})
    np.testing.assert_array_equal(load_illumination(saved)["DNA"], flat)


def test_mean_illumination_streams_and_bad_input_is_reported(screen: object) -> None:
    fields = io.iter_fields(screen.plates[0])
    flat = estimate_illumination(fields, "Mito", statistic="mean", max_images=4, sigma=30)
    assert flat.shape == (128, 128) and np.isfinite(flat).all() and flat.min() > 0
    with pytest.raises(DinoscopeError, match="channel 'Actin' not found"):
        estimate_illumination(io.iter_fields(screen.plates[0]), "Actin")
    with pytest.raises(DinoscopeError, match="no images"):
        estimate_illumination([], "DNA")


def test_too_small_plates_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DinoscopeError, match="cannot hold 7 treatments plus 2 control wells"):
        make_plate(tmp_path, n_rows=2, n_cols=3)
