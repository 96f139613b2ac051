"""Single-cell pretraining data (``data.kind: cells``): crops served for SSL, and the tiny pretraining recipe
producing a backbone that `dinoscope cells embed` can use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import core.data.datasets as core_datasets
from bio.backbone import CellBackbone
from bio.cells import crop_cells
from bio.io import read_image
from bio.pretrain_data import build_cells_dataset
from bio.synthetic import CHANNELS
from core.errors import DinoscopeError

RECIPES = Path(__file__).parents[2] / "recipes"


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
