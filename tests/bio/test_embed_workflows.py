"""Cell workflows around `dinoscope cells embed`: phenotype heads through the CLI, the cell recipes, and the
synthetic-screen acceptance check (embed -> profile -> evaluate)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import core.cli
from bio.embed import embed_plate
from bio.synthetic import make_plate

RECIPES = Path(__file__).parents[2] / "recipes"


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


@pytest.mark.parametrize(
    "recipe,schema",
    [
        ("tiny/cells_embed.yaml", "CellsEmbedRecipe"),
        ("bio/cells_embed_vits8.yaml", "CellsEmbedRecipe"),
        ("bio/cells_embed_jump.yaml", "CellsEmbedRecipe"),
        ("bio/cells_profile_jump.yaml", "CellsProfileRecipe"),
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
