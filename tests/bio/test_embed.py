"""`dinoscope cells embed`: run layout, crash-resume, rank sharding, centroid sources, heads, pretraining data, and
the synthetic-screen acceptance check (embed -> profile -> evaluate)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import zarr

import bio.embed as embed_mod
import core.cli
import core.data.datasets as core_datasets
from bio.backbone import CellBackbone
from bio.cells import crop_cells, match_centroids
from bio.embed import embed_plate
from bio.io import read_image
from bio.pretrain_data import build_cells_dataset
from bio.profiles import open_run
from bio.synthetic import CHANNELS, make_plate
from core.errors import DinoscopeError
from core.models import VisionTransformer
from core.weights import WeightMeta, save_backbone

RECIPES = Path(__file__).parents[2] / "recipes"
BOC = dict(
    img_size=32, patch_size=8, in_chans=1, channel_adaptive=True, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0
)


@pytest.fixture(scope="module")
def screen(tmp_path_factory: pytest.TempPathFactory) -> object:
    return make_plate(tmp_path_factory.mktemp("screen"), n_rows=3, n_cols=3, fields=2, size=64, plates=1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    meta = WeightMeta(
        arch="vit_test",
        model_kwargs=BOC,
        channel_names=["channel"],
        mean=[0.0],
        std=[1.0],
        extra={"input_normalisation": "per_image_zscore"},
    )
    return save_backbone(VisionTransformer(**BOC), meta, tmp_path_factory.mktemp("w") / "boc.safetensors")


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
    assert list(cells.columns) == ["plate", "well", "site", "cell_id", "x", "y", "edge"]
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
    real_commit, calls = embed_mod.PartWriter._commit, []

    def crash_on_fifth(self: embed_mod.PartWriter, record: dict) -> None:
        calls.append(record["field"])
        if len(calls) == 5:
            raise RuntimeError("killed")  # rows of field 4 are on disk, its commit line is not
        real_commit(self, record)

    monkeypatch.setattr(embed_mod.PartWriter, "_commit", crash_on_fifth)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        _embed(screen, weights, run)
    part = run / "parts" / "rank-0000"
    assert len((part / "committed.jsonl").read_text().splitlines()) == 4 and (part / "field-00000004.npz").exists()
    with (part / "committed.jsonl").open("a") as handle:
        handle.write('{"field": 9, "ro')  # a commit line torn by the crash
    monkeypatch.setattr(embed_mod.PartWriter, "_commit", real_commit)
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
    monkeypatch.setattr(embed_mod, "_start_barrier", lambda: None)  # ranks run one after the other here
    run = tmp_path / "run"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _embed(screen, weights, run)["rank"] == 1 and not (run / "embeddings.zarr").exists()
    fields = [r["field"] for r in embed_mod.read_commits(run / "parts" / "rank-0001")]
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
    fixed = dict(BOC, in_chans=3, channel_adaptive=False)
    path = save_backbone(
        VisionTransformer(**fixed),
        WeightMeta("vit_test", fixed, ["DNA", "RNA", "Golgi"], [0.5] * 3, [0.2] * 3),
        tmp_path / "fixed",
    )
    with pytest.raises(DinoscopeError, match=r"missing \['Golgi'\]"):
        _embed(screen, path, tmp_path / "c")
    assert not (tmp_path / "c" / "parts").exists()


def test_embed_command_with_a_phenotype_head(
    screen: object, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = [
        *map(str, screen.plates),
        "--weights",
        str(weights),
        "--centroids",
        "table",
        "--nuclei-table",
        str(screen.nuclei),
        "--crop-size",
        "32",
    ]
    assert core.cli.main(["cells", "embed", *args, "--out", str(tmp_path / "run")]) == 0
    assert (
        core.cli.main(
            [
                "cells",
                "fit-head",
                str(tmp_path / "run"),
                "--platemap",
                str(screen.platemap),
                "--label",
                "role",
                "--out",
                str(tmp_path / "head"),
                "--epochs",
                "5",
            ]
        )
        == 0
    )
    assert (
        core.cli.main(
            [
                "cells",
                "embed",
                *args,
                "--out",
                str(tmp_path / "run2"),
                "--head",
                str(tmp_path / "head"),
                "--set",
                "model.batch_size=7",
            ]
        )
        == 0
    )
    cells = pd.read_parquet(tmp_path / "run2" / "cells.parquet")
    probs = cells[["prob_active", "prob_inert", "prob_negative_control"]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    names = np.array(["active", "inert", "negative_control"])
    assert cells["predicted_role"].tolist() == names[probs.argmax(axis=1)].tolist()
    assert (
        core.cli.main(
            [
                "cells",
                "embed",
                *args,
                "--out",
                str(tmp_path / "run3"),
                "--head",
                str(tmp_path / "head"),
                "--channels",
                "DNA,ER",
            ]
        )
        == 2
    )
    assert "trained on different embeddings" in capsys.readouterr().err


def test_cells_dataset_serves_crops_for_pretraining(screen: object, tmp_path: Path) -> None:
    dataset = build_cells_dataset(
        plates=[str(screen.plates[0])],
        crop_size=32,
        centroids="table",
        nuclei_table=str(screen.nuclei),
        channels=["Mito", "DNA"],
    )
    nuclei = pd.read_csv(screen.nuclei)
    assert dataset.channel_names == ["Mito", "DNA"] and 0 < len(dataset) < len(nuclei)  # border cells skipped
    item = dataset[3]
    assert item.shape == (32, 32, 2) and item.dtype == np.float32
    field = dataset.fields[int(dataset.field_of[3])]
    with read_image(field.path, ["Mito", "DNA"]) as image:
        expected = crop_cells(image.read(), dataset.centres[3:4].astype(np.float64), 32).crops[0]
    np.testing.assert_array_equal(item, np.moveaxis(expected, 0, -1).astype(np.float32))
    with pytest.raises(DinoscopeError, match="unknown keys"):
        build_cells_dataset(plates=str(screen.plates[0]), crop=32)


def test_tiny_cells_pretraining_recipe_trains_a_backbone_cells_embed_can_use(
    screen: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import PretrainRecipe, load_recipe, to_yaml
    from core.train.export import export_run
    from core.train.loop import train

    monkeypatch.setitem(core_datasets.DATASET_KINDS, "cells", build_cells_dataset)  # until the entry point exists
    recipe = load_recipe(
        PretrainRecipe,
        RECIPES / "tiny" / "cells_pretrain.yaml",
        [
            f"data.params.plates={json.dumps([str(p) for p in screen.plates])}",
            f"data.params.nuclei_table={json.dumps(str(screen.nuclei))}",
            "optim.epoch_length=2",
            "train.batch_size_per_rank=4",
            "train.checkpoint_every=2",
        ],
    )
    (tmp_path / "config.yaml").write_text(to_yaml(recipe))
    last = train(recipe, tmp_path, resume=False)
    assert last["iteration"] == 2 and np.isfinite(last["loss/total"])
    backbone = CellBackbone.load(export_run(tmp_path, tmp_path / "backbone.safetensors"))
    assert backbone.channel_adaptive and backbone.normalisation == "zscore"
    crops = np.random.default_rng(0).integers(0, 4000, (2, 5, 32, 32)).astype(np.uint16)
    assert backbone.embed(crops, list(CHANNELS)).shape == (2, 5 * 64)


@pytest.mark.parametrize(
    "recipe,schema",
    [
        ("tiny/cells_embed.yaml", "CellsEmbedRecipe"),
        ("bio/cells_embed_vits8.yaml", "CellsEmbedRecipe"),
        ("tiny/cells_profile.yaml", "CellsProfileRecipe"),
        ("tiny/cells_pretrain.yaml", "PretrainRecipe"),
        ("bio/pretrain_channel_adaptive_vits.yaml", "PretrainRecipe"),
    ],
)
def test_cell_recipes_validate_against_their_schema(recipe: str, schema: str) -> None:
    import yaml

    import bio.config
    import core.config
    from core.config import load_recipe

    cls = getattr(bio.config, schema, None) or getattr(core.config, schema)
    kind = yaml.safe_load((RECIPES / recipe).read_text())["kind"]
    assert kind == {"CellsEmbedRecipe": "cells_embed", "CellsProfileRecipe": "cells_profile"}.get(schema, "pretrain")
    loaded = load_recipe(cls, RECIPES / recipe)
    if schema == "PretrainRecipe":
        assert loaded.model.channel_adaptive and loaded.model.in_chans == 1 and loaded.data.kind == "cells"
        assert loaded.crops.channel_mode == "fluorescence"
    import bio.kinds

    kinds = {"cells_embed": bio.kinds.cells_embed_kind, "cells_profile": bio.kinds.cells_profile_kind}
    if kind in kinds:
        assert kinds[kind]().schema is cls


def test_synthetic_screen_acceptance(weights: Path, tmp_path: Path) -> None:
    """Embed -> profile -> evaluate a two-plate synthetic screen with a random-init bag-of-channels ViT.

    Actives must be retrieved against controls better than inert treatments, and per-plate normalisation on the
    controls must remove the plate effect that fixed-statistics inputs keep.
    """
    from bio.evaluate import evaluate_profiles
    from bio.profiling import build_profiles

    screen = make_plate(tmp_path / "screen", n_rows=4, n_cols=6, fields=1, size=96, plates=2, seed=3)
    separation = {}
    for norm in ("zscore", "meta"):
        embed_plate(
            screen.plates,
            tmp_path / norm,
            weights=weights,
            crop_size=32,
            centroids="table",
            nuclei_table=screen.nuclei,
            avgpool=True,
            normalisation=norm,
        )
        provenance = build_profiles(tmp_path / norm, screen.platemap, tmp_path / f"{norm}.parquet")
        separation[norm] = provenance["batch_separation"]
    metrics = evaluate_profiles(tmp_path / "zscore.parquet", tmp_path / "eval", null_size=500, plots=False)
    per = {r["label"]: r["mean_average_precision"] for r in metrics["activity"]["per_label"]}
    active = np.mean([v for k, v in per.items() if not k.startswith("inert")])
    inert = np.mean([v for k, v in per.items() if k.startswith("inert")])
    assert active > inert + 0.15
    before, after = separation["meta"]["before_normalisation"], separation["meta"]["after_normalisation"]
    assert before["silhouette"] > 0.5 and after["silhouette"] < before["silhouette"] - 0.4
    assert after["knn_accuracy"] <= after["chance_accuracy"] < before["knn_accuracy"]
