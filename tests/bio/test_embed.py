"""`dinoscope cells embed`: run layout, crash-resume, rank sharding, centroid sources, edge/dtype options and input
checks (fixtures ``screen`` and ``weights`` come from ``conftest.py``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

import bio.embed_store as store_mod
from bio.backbone import CellBackbone
from bio.cells import crop_cells, match_centroids
from bio.embed import embed_plate
from bio.io import read_image
from bio.profiles import open_run
from bio.synthetic import CHANNELS
from core.errors import DinoscopeError
from core.models import VisionTransformer
from core.weights import WeightMeta, save_backbone


def _embed(screen: object, weights: Path, out: Path, **options: object) -> dict:
    settings = dict(crop_size=32, centroids="table", nuclei_table=screen.nuclei, batch_size=4)
    return embed_plate(screen.plates, out, weights=weights, **{**settings, **options})


@pytest.fixture(scope="module")
def reference_run(screen: object, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    _embed(screen, weights, run)
    return run


def _load(run: Path) -> tuple[np.ndarray, pd.DataFrame]:
    return np.asarray(zarr.open_group(run / "embeddings.zarr", mode="r")["embeddings"][:]), pd.read_parquet(
        run / "cells.parquet"
    )


def test_run_has_the_layout_profiles_reads(screen: object, weights: Path, reference_run: Path) -> None:
    run = open_run(reference_run)
    nuclei = pd.read_csv(screen.nuclei)
    assert run.n_cells == len(nuclei) and run.dim == 5 * 64
    emb, cells = _load(reference_run)
    qc = ["nucleus_area", "saturated_fraction", *(f"focus_{c}" for c in CHANNELS), "qc_blur", "qc_saturated"]
    assert list(cells.columns) == ["plate", "well", "site", "cell_id", "x", "y", "edge", *qc, "qc_debris"]
    assert cells["nucleus_area"].between(30, 400).all() and (cells["saturated_fraction"] == 0).all()
    pd.testing.assert_frame_equal(
        cells[["well", "site", "cell_id"]],
        nuclei.astype({"site": str}).rename(columns={"ObjectNumber": "cell_id"})[["well", "site", "cell_id"]],
        check_dtype=False,
    )
    attrs = zarr.open_group(reference_run / "embeddings.zarr", mode="r").attrs.asdict()
    assert attrs["channel_names"] == list(CHANNELS) and attrs["normalisation"]["method"] == "zscore"
    assert attrs["weights"]["meta"]["model_kwargs"]["channel_adaptive"] is True
    assert len(attrs["weights"]["sha256"]) == 64 and attrs["crops"] == {"size": 32, "edge": "pad"}
    # rows of the field B/2/1 are the backbone applied to that field's crops
    with read_image(screen.plates[0] / "B" / "2" / "1") as image:
        data = image.read()
    rows = (cells["well"] == "B02") & (cells["site"] == "1")
    crops = crop_cells(data, cells.loc[rows, ["y", "x"]].to_numpy(), 32)
    expected = CellBackbone.load(weights, batch_size=4).embed(crops.crops, list(CHANNELS))
    np.testing.assert_allclose(emb[rows.to_numpy()], expected, atol=1e-6)
    assert cells.loc[rows, "edge"].tolist() == crops.at_edge.tolist()
    assert not (reference_run / "parts").exists()
    log = [json.loads(line) for line in (reference_run / "embed_log.jsonl").read_text().splitlines()]
    assert sorted(r["field"] for r in log) == list(range(18))


def test_a_crash_mid_plate_resumes_to_the_same_store(
    screen: object, weights: Path, reference_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_commit, calls = store_mod.PartWriter._commit, []

    def crash_on_fifth(self: store_mod.PartWriter, record: dict) -> None:
        calls.append(record["field"])
        if len(calls) == 5:
            raise RuntimeError("killed")  # rows of field 4 are on disk, its commit line is not
        real_commit(self, record)

    monkeypatch.setattr(store_mod.PartWriter, "_commit", crash_on_fifth)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        _embed(screen, weights, run)
    part = run / "parts" / "rank-0000"
    assert len((part / "committed.jsonl").read_text().splitlines()) == 4 and (part / "field-00000004.rows").exists()
    with (part / "committed.jsonl").open("a") as handle:
        handle.write('{"field": 9, "ro')  # a commit line torn by the crash
    monkeypatch.setattr(store_mod.PartWriter, "_commit", real_commit)
    summary = _embed(screen, weights, run)
    assert summary["n_cells"] == open_run(reference_run).n_cells
    got, want = _load(run), _load(reference_run)
    np.testing.assert_array_equal(got[0], want[0])
    pd.testing.assert_frame_equal(got[1], want[1])
    log = [json.loads(line)["field"] for line in (run / "embed_log.jsonl").read_text().splitlines()]
    assert sorted(log) == list(range(18))  # fields 0-3 were not embedded again
    assert _embed(screen, weights, run)["n_cells"] == summary["n_cells"]  # a finished run is left alone
    with pytest.raises(DinoscopeError, match=r"different settings \(crops\)"):
        _embed(screen, weights, run, crop_size=40)


def test_ranks_take_interleaved_fields_and_rank_zero_merges_in_order(
    screen: object, weights: Path, reference_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod.RankSync, "agree", lambda self, ok: ok)  # ranks run one after the other here
    run = tmp_path / "run"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _embed(screen, weights, run)["rank"] == 1 and not (run / "embeddings.zarr").exists()
    fields = [r["field"] for r in store_mod.read_commits(run / "parts" / "rank-0001")]
    assert fields == list(range(1, 18, 2))
    monkeypatch.setenv("RANK", "0")
    _embed(screen, weights, run, poll_seconds=0.01)
    got, want = _load(run), _load(reference_run)
    np.testing.assert_array_equal(got[0], want[0])
    pd.testing.assert_frame_equal(got[1], want[1])


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_ranks_equal_one_process(
    screen: object, weights: Path, reference_run: Path, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "core.cli",
        "cells",
        "embed",
        *map(str, screen.plates),
        "--weights",
        str(weights),
        "--out",
        str(tmp_path / "run"),
        "--centroids",
        "table",
        "--nuclei-table",
        str(screen.nuclei),
        "--crop-size",
        "32",
        "--device",
        "cpu",
        "--batch-size",
        "4",
    ]
    env = {**os.environ, "DINOSCOPE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    got, want = _load(tmp_path / "run"), _load(reference_run)
    np.testing.assert_array_equal(got[0], want[0])
    pd.testing.assert_frame_equal(got[1], want[1])


def test_detected_nuclei_and_label_images_from_ngff_and_manifests(
    screen: object, weights: Path, tmp_path: Path
) -> None:
    _embed(screen, weights, tmp_path / "detect", centroids="detect")
    cells = pd.read_parquet(tmp_path / "detect" / "cells.parquet")
    truth = pd.read_csv(screen.nuclei)
    match = match_centroids(
        cells[["y", "x"]].to_numpy(), truth[["Nuclei_Location_Center_Y", "Nuclei_Location_Center_X"]].to_numpy(), 4.0
    )
    assert match.recall >= 0.7 and match.precision >= 0.7  # whole-run matching: boxes sit on real nuclei
    # NGFF label images <field>/labels/Nuclei: discs at the true nuclei, labelled with their ObjectNumber
    plate = tmp_path / "labelled.ome.zarr"
    shutil.copytree(screen.plates[0], plate)
    label_attrs = {
        "ome": {
            "version": "0.5",
            "image-label": {},
            "multiscales": [
                {
                    "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                    "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0]}]}],
                }
            ],
        }
    }
    yy, xx = np.mgrid[:64, :64]
    for (well, site), nuclei in truth.groupby(["well", "site"]):
        labels = np.zeros((64, 64), np.uint16)
        for obj, x, y in nuclei[["ObjectNumber", "Nuclei_Location_Center_X", "Nuclei_Location_Center_Y"]].values:
            labels[(yy - y) ** 2 + (xx - x) ** 2 < 16] = obj
        group = zarr.open_group(plate / well[0] / str(int(well[1:])) / str(site) / "labels", mode="w")
        group.create_group("Nuclei", attributes=label_attrs).create_array("0", data=labels, chunks=(64, 64))
    embed_plate([plate], tmp_path / "ngff", weights=weights, crop_size=32, centroids="labels", label_channel="Nuclei")
    cells = pd.read_parquet(tmp_path / "ngff" / "cells.parquet")
    assert cells["cell_id"].tolist() == truth["ObjectNumber"].tolist()
    np.testing.assert_allclose(
        cells[["x", "y"]].to_numpy(),
        truth[["Nuclei_Location_Center_X", "Nuclei_Location_Center_Y"]].to_numpy(),
        atol=0.6,
    )
    # a LoadData manifest with one TIFF per channel plus an instance mask channel "Nuclei"
    rows = []
    for well, site in (("A01", "0"), ("C03", "1")):
        with read_image(screen.plates[0] / well[0] / str(int(well[1:])) / site) as image:
            data = image.read()
        labels = np.zeros(data.shape[1:], np.uint16)
        yy, xx = np.mgrid[: labels.shape[0], : labels.shape[1]]
        for k, (y, x) in enumerate([(20, 20), (40, 45)]):
            labels[(yy - y) ** 2 + (xx - x) ** 2 < 25] = 7 + k
        files = {}
        for name, plane in [*zip(CHANNELS, data, strict=False), ("Nuclei", labels)]:
            tifffile.imwrite(tmp_path / f"{well}_{site}_{name}.tif", plane)
            files[f"FileName_{name}"] = f"{well}_{site}_{name}.tif"
        rows.append({"Metadata_Plate": "P9", "Metadata_Well": well, "Metadata_Site": site, **files})
    pd.DataFrame(rows).to_csv(tmp_path / "load_data.csv", index=False)
    embed_plate(
        [tmp_path / "load_data.csv"],
        tmp_path / "labels",
        weights=weights,
        crop_size=32,
        centroids="labels",
        label_channel="Nuclei",
    )
    emb, cells = _load(tmp_path / "labels")
    assert cells["cell_id"].tolist() == [7, 8, 7, 8] and emb.shape == (4, 5 * 64)
    np.testing.assert_allclose(cells[["y", "x"]].to_numpy()[:2], [[20, 20], [40, 45]])
    attrs = zarr.open_group(tmp_path / "labels" / "embeddings.zarr", mode="r").attrs.asdict()
    assert attrs["channel_names"] == list(CHANNELS)  # the mask channel is not embedded


def test_edge_skip_float16_and_chunking(screen: object, weights: Path, reference_run: Path, tmp_path: Path) -> None:
    _embed(screen, weights, tmp_path / "run", edge="skip", dtype="float16", chunk_rows=8, channels=["Mito", "DNA"])
    array = zarr.open_group(tmp_path / "run" / "embeddings.zarr", mode="r")["embeddings"]
    cells = pd.read_parquet(tmp_path / "run" / "cells.parquet")
    ref = pd.read_parquet(reference_run / "cells.parquet")
    assert array.dtype == np.float16 and array.chunks == (8, 128) and array.shape == (len(cells), 128)
    assert not cells["edge"].any() and len(cells) == int((~ref["edge"]).sum())


def test_bad_inputs_fail_before_any_work(screen: object, weights: Path, tmp_path: Path) -> None:
    with pytest.raises(DinoscopeError, match="channel 'Actin' not found"):
        _embed(screen, weights, tmp_path / "a", channels=["DNA", "Actin"])
    with pytest.raises(DinoscopeError, match="needs a nuclei table"):
        embed_plate(screen.plates, tmp_path / "b", weights=weights, centroids="table")
    fixed = dict(
        img_size=32, patch_size=8, in_chans=3, channel_adaptive=False, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0
    )
    path = save_backbone(
        VisionTransformer(**fixed),
        WeightMeta("vit_test", fixed, ["DNA", "RNA", "Golgi"], [0.5] * 3, [0.2] * 3),
        tmp_path / "fixed",
    )
    with pytest.raises(DinoscopeError, match=r"missing \['Golgi'\]"):
        _embed(screen, path, tmp_path / "c")
    assert not (tmp_path / "c" / "parts").exists()
