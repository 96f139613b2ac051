"""Shared geodino fixtures: one quick canopy fit on synthetic uint8 forests, reused by every test that needs a model
trained the way `canopy fit` trains (with its input record)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from core.config import load_recipe
from geodino.config import CanopyFitRecipe
from geodino.fit import fit_canopy

TINY_FIT = Path(__file__).parents[2] / "recipes" / "tiny" / "canopy_fit.yaml"
QUICK_FIT = ["optim.epochs=8", "data.synthetic.size=192", "train.progress=false"]


@pytest.fixture(scope="session")
def uint8_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``model.safetensors`` of a tiny linear head fitted on uint8 RGB synthetic forests (a few seconds)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("uint8-fit")
    fit_canopy(load_recipe(CanopyFitRecipe, TINY_FIT, QUICK_FIT), run)
    torch.set_num_threads(before)
    yield run / "model.safetensors"
