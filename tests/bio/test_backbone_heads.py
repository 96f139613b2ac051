"""Channel-matched cell backbones (bag of channels and fixed channels, normalisation) and phenotype heads."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

import core.cli
from bio.backbone import CellBackbone
from bio.heads import check_compatible, fit_head, load_head, predict_proba, save_head
from core.errors import DinoscopeError
from core.models import VisionTransformer
from core.weights import WeightMeta, load_backbone, save_backbone

DINOV2_REF = Path(__file__).parents[1] / "data" / "dinov2_reference"
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0, init_values=1e-5)


@pytest.fixture(scope="module")
def boc_fixture() -> dict:
    return torch.load(DINOV2_REF / "cell_dino_bag_of_channels.pt", weights_only=True)


def _fixed_weights(tmp_path: Path, names: list[str], **extra: object) -> Path:
    torch.manual_seed(1)
    kwargs = {**TINY, "in_chans": len(names)}
    meta = WeightMeta(
        arch="vit_test",
        model_kwargs=kwargs,
        channel_names=names,
        mean=[0.1] * len(names),
        std=[0.2] * len(names),
        extra=dict(extra),
    )
    return save_backbone(VisionTransformer(**kwargs), meta, tmp_path / "fixed.safetensors")


def test_bag_of_channels_matches_official_cell_dino_outputs(boc_fixture: dict, tmp_path: Path) -> None:
    model, meta = load_backbone(boc_fixture["state_dict"], **boc_fixture["config"])
    path = save_backbone(model, meta, tmp_path / "boc.safetensors")
    x, out = boc_fixture["inputs"]["x"], boc_fixture["outputs"]
    cls = CellBackbone.load(path, normalisation="none")
    assert cls.channel_adaptive and cls.required_channels is None
    np.testing.assert_allclose(cls.embed(x.numpy(), ["a", "b", "c"]), out["gil_cls_1"].numpy(), atol=1e-5)
    probe = CellBackbone.load(path, normalisation="none", n_last_blocks=2, avgpool=True, batch_size=1)
    np.testing.assert_allclose(probe.embed(x, ["a", "b", "c"]), out["linear_input_avgpool"].numpy(), atol=1e-5)
    assert probe.describe(["a", "b", "c"])["features"]["dim"] == out["linear_input_avgpool"].shape[1]
    # the same weights without the flag (shape inference cannot see it) are still run channel by channel
    plain, plain_meta = load_backbone(boc_fixture["state_dict"], num_heads=4)
    assert not plain.bag_of_channels
    np.testing.assert_allclose(
        CellBackbone(plain, plain_meta, normalisation="none").embed(x, ["a", "b", "c"]),
        out["gil_cls_1"].numpy(),
        atol=1e-5,
    )


def test_bag_of_channels_takes_any_subset_and_order(boc_fixture: dict) -> None:
    model, meta = load_backbone(boc_fixture["state_dict"], **boc_fixture["config"])
    backbone = CellBackbone(model, meta, normalisation="none")
    x = boc_fixture["inputs"]["x"].numpy()
    full = backbone.embed(x, ["DNA", "ER", "RNA"]).reshape(2, 3, -1)
    subset = backbone.embed(x[:, [2, 0]], ["RNA", "DNA"]).reshape(2, 2, -1)
    np.testing.assert_allclose(subset, full[:, [2, 0]], atol=1e-5)
    assert backbone.match_channels(["RNA", "DNA"]).names == ["RNA", "DNA"]


def test_fixed_channels_are_reordered_by_name_and_extra_ones_ignored(tmp_path: Path) -> None:
    backbone = CellBackbone.load(_fixed_weights(tmp_path, ["DNA", "ER", "RNA"]), normalisation="none")
    rng = np.random.default_rng(0)
    data = rng.normal(size=(3, 4, 32, 32)).astype(np.float32)  # channels RNA, AGP, DNA, ER
    plan = backbone.match_channels(["RNA", "AGP", "DNA", "ER"])
    assert plan.indices == [2, 3, 0] and plan.ignored == ["AGP"]
    expected = backbone.model.get_intermediate_layers(torch.from_numpy(data[:, [2, 3, 0]]), 1, return_class_token=True)[
        0
    ][1]
    np.testing.assert_allclose(backbone.embed(data, ["RNA", "AGP", "DNA", "ER"]), expected.detach().numpy(), atol=1e-5)


def test_missing_channel_names_what_the_weights_need_and_what_the_data_has(tmp_path: Path) -> None:
    backbone = CellBackbone.load(_fixed_weights(tmp_path, ["DNA", "ER", "RNA"]))
    with pytest.raises(
        DinoscopeError,
        match=r"need channels \['DNA', 'ER', 'RNA'\] but the data has "
        r"\['DNA', 'ER', 'Mito'\]; missing \['RNA'\]",
    ):
        backbone.embed(np.zeros((1, 3, 32, 32), np.uint16), ["DNA", "ER", "Mito"])
    generic = CellBackbone.load(_fixed_weights(tmp_path, ["ch0", "ch1", "ch2"]))
    with pytest.raises(DinoscopeError, match="--weights-channels"):
        generic.match_channels(["DNA", "ER", "RNA"])
    named = CellBackbone.load(tmp_path / "fixed.safetensors", weights_channels=["Mito", "DNA", "ER"])
    assert named.match_channels(["DNA", "ER", "Mito"]).indices == [2, 0, 1]
    with pytest.raises(DinoscopeError, match="takes 3 channels"):
        CellBackbone.load(tmp_path / "fixed.safetensors", weights_channels=["DNA"])


def test_zscore_is_per_crop_and_meta_uses_the_stored_statistics(tmp_path: Path) -> None:
    path = _fixed_weights(tmp_path, ["DNA", "ER", "RNA"], input_normalisation="per_image_zscore")
    auto = CellBackbone.load(path)
    assert auto.normalisation == "zscore"
    crops = np.random.default_rng(1).integers(100, 4000, size=(4, 3, 32, 32)).astype(np.uint16)
    brighter = crops.astype(np.float32) * np.float32([2.0, 0.5, 3.0])[:, None, None] + 250.0
    np.testing.assert_allclose(
        auto.embed(crops, ["DNA", "ER", "RNA"]), auto.embed(brighter, ["DNA", "ER", "RNA"]), atol=1e-3
    )
    meta = CellBackbone.load(path, normalisation="meta")
    none = CellBackbone.load(path, normalisation="none")
    scaled = (crops.astype(np.float32) / 65535.0 - 0.1) / 0.2  # uint16 -> [0, 1], then the sidecar mean/std
    np.testing.assert_allclose(
        meta.embed(crops, ["DNA", "ER", "RNA"]), none.embed(scaled, ["DNA", "ER", "RNA"]), atol=1e-5
    )
    assert CellBackbone.load(_fixed_weights(tmp_path, ["DNA", "ER", "RNA"])).normalisation == "meta"


def test_crop_size_must_fit_the_patch_grid(tmp_path: Path) -> None:
    backbone = CellBackbone.load(_fixed_weights(tmp_path, ["DNA", "ER", "RNA"]))
    with pytest.raises(DinoscopeError, match="multiple of the patch size 8"):
        backbone.embed(np.zeros((1, 3, 30, 30), np.float32), ["DNA", "ER", "RNA"])
    resized = CellBackbone.load(tmp_path / "fixed.safetensors", input_size=32)
    assert resized.embed(np.zeros((2, 3, 30, 30), np.float32), ["DNA", "ER", "RNA"]).shape == (2, 64)


# ---------------------------------------------------------------------------------------------- phenotype heads
def _labelled_run(root: Path, *, dim: int = 12, cells: int = 30) -> tuple[Path, Path]:
    """A 2-plate run whose wells carry one of three treatments, each shifting its cells' embeddings."""
    rng = np.random.default_rng(0)
    centres = {t: rng.normal(0, 2.0, dim) for t in ("DMSO", "drug_a", "drug_b")}
    rows, embs, layout = [], [], []
    for plate in ("P1", "P2"):
        for i in range(12):
            well, treatment = f"{string.ascii_uppercase[i // 6]}{i % 6 + 1:02d}", ("DMSO", "drug_a", "drug_b")[i % 3]
            layout.append(
                {
                    "plate": plate,
                    "well": well,
                    "treatment": treatment,
                    "role": "negative_control" if treatment == "DMSO" else "active",
                }
            )
            embs.append(centres[treatment] + rng.normal(0, 1, (cells, dim)))
            rows.append(
                pd.DataFrame(
                    {
                        "plate": plate,
                        "well": well,
                        "site": "0",
                        "cell_id": np.arange(cells),
                        "x": 1.0,
                        "y": 1.0,
                        "edge": False,
                    }
                )
            )
    run = root / "run"
    group = zarr.open_group(run / "embeddings.zarr", mode="w")
    group.attrs.update(
        {
            "channel_names": ["DNA", "ER"],
            "channel_mode": "bag_of_channels",
            "normalisation": {"method": "zscore"},
            "features": {"dim": dim},
            "weights": {"sha256": "abc"},
        }
    )
    group.create_array("embeddings", shape=(24 * cells, dim), chunks=(50, dim), dtype="float32")[:] = np.concatenate(
        embs
    )
    pd.concat(rows, ignore_index=True).to_parquet(run / "cells.parquet")
    pd.DataFrame(layout).to_csv(root / "platemap.csv", index=False)
    return run, root / "platemap.csv"


def test_head_is_trained_on_wells_disjoint_from_its_held_out_wells(tmp_path: Path) -> None:
    run, platemap = _labelled_run(tmp_path)
    classifier, meta, metrics = fit_head(run, platemap, label="treatment", epochs=30, max_cells_per_well=20)
    assert set(metrics["train_wells"]).isdisjoint(metrics["held_out_wells"])
    assert len(metrics["train_wells"]) + len(metrics["held_out_wells"]) == 24
    held_out = {w for w in metrics["held_out_wells"]}
    layout = pd.read_csv(platemap)
    labels_out = {
        t for p, w, t in layout[["plate", "well", "treatment"]].itertuples(index=False) if f"{p}/{w}" in held_out
    }
    assert labels_out == {"DMSO", "drug_a", "drug_b"}  # every class is scored on unseen wells
    assert metrics["n_test_cells"] == 20 * metrics["n_test_wells"]
    assert metrics["macro_f1"] > 0.9 and metrics["well_macro_f1"] == 1.0
    assert meta["classes"] == ["DMSO", "drug_a", "drug_b"] and meta["channel_names"] == ["DNA", "ER"]

    path = save_head(classifier, meta, metrics, tmp_path / "head")
    assert json.loads((tmp_path / "head" / "metrics.json").read_text())["macro_f1"] == metrics["macro_f1"]
    loaded, loaded_meta = load_head(tmp_path / "head")
    x = np.asarray(zarr.open_group(run / "embeddings.zarr", mode="r")["embeddings"][:40])
    np.testing.assert_allclose(predict_proba(loaded, x), predict_proba(classifier, x), atol=1e-6)
    np.testing.assert_allclose(predict_proba(loaded, x).sum(axis=1), 1.0, atol=1e-5)
    assert loaded_meta["path"] == str(path) and len(loaded_meta["sha256"]) == 64


def test_head_refuses_embeddings_made_differently(tmp_path: Path) -> None:
    run, platemap = _labelled_run(tmp_path)
    _, meta, _ = fit_head(run, platemap, epochs=2)
    same = {
        "channel_names": ["DNA", "ER"],
        "normalisation": {"method": "zscore"},
        "features": {"dim": 12},
        "weights": {"sha256": "abc"},
    }
    check_compatible(meta, same, "head")
    with pytest.raises(DinoscopeError, match=r"channel_names: head \['DNA', 'ER'\] vs now \['ER', 'DNA'\]"):
        check_compatible(meta, {**same, "channel_names": ["ER", "DNA"]}, "head")
    with pytest.raises(DinoscopeError, match="weights_sha256"):
        check_compatible(meta, {**same, "weights": {"sha256": "other"}}, "head")


def test_fit_head_command_writes_head_and_reports_bad_labels(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, platemap = _labelled_run(tmp_path)
    out = tmp_path / "head"
    assert (
        core.cli.main(["cells", "fit-head", str(run), "--platemap", str(platemap), "--out", str(out), "--epochs", "5"])
        == 0
    )
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {
        "head.safetensors",
        "head.json",
        "metrics.json",
    }
    assert (
        core.cli.main(
            [
                "cells",
                "fit-head",
                str(run),
                "--platemap",
                str(platemap),
                "--out",
                str(tmp_path / "h2"),
                "--label",
                "moa",
            ]
        )
        == 2
    )
    assert "plate map lacks column(s) ['moa']" in capsys.readouterr().err
