"""Nucleus centroids, nucleus detection on a real DSB2018 image, single-cell crops, and intensity normalisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from bio import io
from bio.cells import centroids_from_labels, centroids_from_table, crop_cells, detect_nuclei, match_centroids
from bio.preprocess import NormalisationSpec, normalise
from core.errors import DinoscopeError

REAL = Path(__file__).parents[1] / "data" / "real"


@pytest.fixture(scope="module")
def real_nuclei() -> tuple[np.ndarray, np.ndarray]:
    return tifffile.imread(REAL / "nuclei_dsb2018_img.tif"), tifffile.imread(REAL / "nuclei_dsb2018_labels.tif")


def test_detected_nuclei_match_the_real_annotation(real_nuclei: tuple[np.ndarray, np.ndarray]) -> None:
    image, labels = real_nuclei
    reference = centroids_from_labels(labels)
    assert reference.shape == (125, 2)
    detected, detected_labels = detect_nuclei(image, return_labels=True)
    match = match_centroids(detected, reference, max_distance=6.0)
    # measured with the defaults: 117 detections, precision 0.89, recall 0.83, median distance 0.85 px
    assert match.recall >= 0.8 and match.precision >= 0.8
    assert np.median(match.distances) < 1.5
    assert detected_labels.shape == image.shape and detected_labels.max() == len(detected)


def test_detection_on_an_empty_image_finds_nothing() -> None:
    centroids, labels = detect_nuclei(np.full((32, 32), 7, np.uint16), return_labels=True)
    assert centroids.shape == (0, 2) and not labels.any()
    with pytest.raises(DinoscopeError, match="one Y x X channel"):
        detect_nuclei(np.zeros((2, 8, 8)))


def test_label_centroids_are_in_yx_order_and_crops_centre_on_each_nucleus(
    real_nuclei: tuple[np.ndarray, np.ndarray],
) -> None:
    image, labels = real_nuclei
    centroids = centroids_from_labels(labels)
    ids = np.unique(labels)[1:]
    first = np.argwhere(labels == ids[0]).mean(axis=0)
    np.testing.assert_allclose(centroids[0], first)  # (row, col), i.e. (y, x)
    stack = np.stack([image, labels.astype(image.dtype)])
    crops = crop_cells(stack, centroids, 32, edge="pad")
    assert crops.crops.shape == (125, 2, 32, 32) and crops.crops.dtype == image.dtype
    centre_labels = crops.crops[:, 1, 16, 16]
    # a centroid of a convex-ish nucleus lies inside it: the crop centre shows that nucleus' label
    assert np.mean(centre_labels == ids[crops.kept]) > 0.95
    np.testing.assert_array_equal(crops.crops[:, 0, 16, 16], image[tuple(np.floor(centroids + 0.5).astype(int).T)])


def test_crop_cells_pads_or_skips_at_the_border_and_records_it() -> None:
    data = np.arange(2 * 20 * 30, dtype=np.uint16).reshape(2, 20, 30) + 1
    centroids = np.array([[10.0, 15.0], [1.2, 2.0], [19.0, 29.4], [np.nan, 3.0], [25.0, 5.0]])
    padded = crop_cells(data, centroids, 8, edge="pad")
    np.testing.assert_array_equal(padded.kept, [0, 1, 2])  # NaN and outside-the-image centroids are dropped
    np.testing.assert_array_equal(padded.at_edge, [False, True, True])
    np.testing.assert_array_equal(padded.crops[0], data[:, 6:14, 11:19])
    # centre (1, 2): rows -3..4, cols -2..5 -> first 3 rows and 2 columns are padding
    assert (padded.crops[1][:, :3] == 0).all() and (padded.crops[1][:, :, :2] == 0).all()
    np.testing.assert_array_equal(padded.crops[1][:, 3:, 2:], data[:, 0:5, 0:6])
    skipped = crop_cells(data, centroids, 8, edge="skip")
    np.testing.assert_array_equal(skipped.kept, [0])
    assert skipped.crops.shape == (1, 2, 8, 8) and not skipped.at_edge.any()
    empty = crop_cells(data, np.zeros((0, 2)), 8)
    assert empty.crops.shape == (0, 2, 8, 8)
    with pytest.raises(DinoscopeError, match="edge policy"):
        crop_cells(data, centroids, 8, edge="wrap")  # type: ignore[arg-type]


def test_crops_from_a_lazy_image_equal_crops_from_memory(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 4000, (5, 40, 50)).astype(np.uint16)
    image = io.read_image(
        io.write_ome_tiff(tmp_path / "f.ome.tif", data, ["DNA", "ER", "RNA", "AGP", "Mito"]), ["Mito", "DNA"]
    )
    centroids = np.array([[20.0, 25.0], [3.0, 47.0]])
    lazy = crop_cells(image.data, centroids, 16)
    np.testing.assert_array_equal(lazy.crops, crop_cells(data[[4, 0]], centroids, 16).crops)


def test_centroids_from_a_cellprofiler_table_filter_and_swap_xy(tmp_path: Path) -> None:
    table = pd.DataFrame(
        {
            "Metadata_Plate": ["P1", "P1", "P2"],
            "Metadata_Well": ["A01", "A01", "A01"],
            "Metadata_Site": [1, 2, 1],
            "Nuclei_Location_Center_X": [5.0, 6.0, 7.0],
            "Nuclei_Location_Center_Y": [50.0, 60.0, 70.0],
        }
    )
    path = tmp_path / "Nuclei.csv"
    table.to_csv(path, index=False)
    np.testing.assert_array_equal(centroids_from_table(path, plate="P1", well="A01", site="2"), [[60.0, 6.0]])
    assert centroids_from_table(table, well="A01").shape == (3, 2)
    with pytest.raises(DinoscopeError, match="no column 'Nuclei_Location_Center_X'"):
        centroids_from_table(table.drop(columns="Nuclei_Location_Center_X"))
    with pytest.raises(DinoscopeError, match="no plate column"):
        centroids_from_table(table.drop(columns="Metadata_Plate"), plate="P1")


def test_match_centroids_is_one_to_one_within_the_distance() -> None:
    reference = np.array([[0.0, 0.0], [10.0, 10.0], [30.0, 30.0]])
    predicted = np.array([[1.0, 0.0], [0.0, 1.0], [10.0, 12.0], [50.0, 50.0]])
    match = match_centroids(predicted, reference, max_distance=3.0)
    assert len(match.pairs) == 2 and match.precision == 0.5 and match.recall == pytest.approx(2 / 3)
    np.testing.assert_allclose(sorted(match.distances), [1.0, 2.0])


def test_percentile_normalisation_clips_and_scales_each_channel() -> None:
    rng = np.random.default_rng(0)
    data = np.stack([rng.normal(100, 10, (64, 64)), rng.normal(5000, 900, (64, 64))]).astype(np.uint16)
    out = normalise(data, "percentile", low=1, high=99)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    for c in range(2):
        lo, hi = np.percentile(data[c], [1, 99])
        np.testing.assert_allclose(out[c], (np.clip(data[c], lo, hi) - lo) / (hi - lo), rtol=1e-5, atol=1e-6)
        assert abs(np.mean(out[c] == 0) - 0.01) < 0.01
    assert (normalise(np.full((1, 4, 4), 9.0), "percentile") == 0).all()  # flat channel: no division by zero


def test_zscore_normalisation_is_per_image_and_channel() -> None:
    data = (
        np.random.default_rng(1).gamma(2.0, 300.0, (3, 32, 32)).astype(np.float32)
        * np.array([1, 10, 100])[:, None, None]
    )
    out = normalise(data, "zscore")
    np.testing.assert_allclose(out.mean(axis=(1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=(1, 2)), 1, atol=1e-4)
    with pytest.raises(DinoscopeError, match="unknown normalisation 'minmax'"):
        normalise(data, "minmax")  # type: ignore[arg-type]


def test_normalisation_spec_roundtrips_and_applies() -> None:
    spec = NormalisationSpec(method="percentile", low=2.0, high=98.0, illumination="illum.npz")
    again = NormalisationSpec.from_dict(spec.to_dict())
    assert again == spec and spec.to_dict()["method"] == "percentile"
    data = np.random.default_rng(2).random((2, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(spec.apply(data), normalise(data, "percentile", low=2.0, high=98.0))
    with pytest.raises(DinoscopeError, match="unknown normalisation keys"):
        NormalisationSpec.from_dict({"method": "zscore", "gamma": 2})
    with pytest.raises(DinoscopeError, match="unknown normalisation"):
        NormalisationSpec(method="l2")  # type: ignore[arg-type]
