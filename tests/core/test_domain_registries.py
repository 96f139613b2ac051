"""Domain knowledge lives in the domains: photometric chains are looked up by ``crops.channel_mode`` (core builds
``rgb``, geodino and bio register ``multispectral`` and ``fluorescence``), and the inputs ``dinoscope launch`` checks
are declared (schema fields marked ``input_path``, dataset kinds' ``input_params``), never guessed from key names."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import albumentations as albu
import numpy as np
import pytest

import core.config.pretrain as pretrain_schema
import core.data.photometric as photometric
from bio.augment import fluorescence_chain
from bio.pretrain_data import build_cells_dataset
from core.config import load_recipe
from core.config.fields import input_path
from core.config.pretrain import CORE_CHANNEL_MODES, DataCfg, PretrainRecipe, channel_modes
from core.data import MultiCropAugmentation
from core.data.datasets import ImageFolderDataset, SyntheticShapesDataset, dataset_kinds
from core.data.photometric import CORE_CHAINS, ChainSettings, PhotometricChain, chain_factory
from core.errors import DinoscopeError
from core.launch import check_data_paths, input_paths
from geodino.augment import multispectral_chain
from geodino.pretrain_data import build_geotiff_dataset

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "pretrain.yaml"
SMALL = {"global_crops_size": 16, "local_crops_size": 8, "local_crops_number": 1, "seed": 0}


# ------------------------------------------------------------------------------------------ photometric chains
def test_core_builds_rgb_and_the_domains_register_theirs() -> None:
    assert tuple(CORE_CHAINS) == CORE_CHANNEL_MODES == ("rgb",)
    registered = {ep.name: ep.value for ep in entry_points(group="dinoscope.augmentations")}
    assert registered["multispectral"].startswith("geodino.") and registered["fluorescence"].startswith("bio.")
    assert chain_factory("multispectral") is multispectral_chain
    assert chain_factory("fluorescence") is fluorescence_chain
    # The schema (names only, nothing imported) and the augmentation see the same registry.
    assert set(channel_modes()) == set(photometric.chain_factories()) >= {"rgb", "multispectral", "fluorescence"}


def test_unknown_mode_lists_every_registered_mode_in_recipe_and_augmentation() -> None:
    with pytest.raises(DinoscopeError) as info:
        load_recipe(PretrainRecipe, TINY, ["crops.channel_mode=hyperspectral"])
    assert info.value.field == "crops.channel_mode"
    assert all(mode in info.value.fix for mode in ("rgb", "multispectral", "fluorescence"))
    with pytest.raises(DinoscopeError) as info:
        MultiCropAugmentation(channel_mode="hyperspectral")
    assert info.value.field == "channel_mode"
    assert all(mode in info.value.fix for mode in ("rgb", "multispectral", "fluorescence"))


class _Gain(albu.ImageOnlyTransform):
    """A plugin chain's own transform."""

    def __init__(self, gain: float) -> None:
        super().__init__(p=1.0)
        self.gain = gain

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return img * self.gain


def _toy_chain(settings: ChainSettings, *, gain: float = 2.0) -> PhotometricChain:
    return PhotometricChain(shared=[_Gain(gain)])


class _ToyEntryPoint:
    name, value, group = "toy", "tests:_toy_chain", "dinoscope.augmentations"

    def load(self) -> Any:
        return _toy_chain


def test_a_mode_a_plugin_registers_is_accepted_by_recipes_and_built(monkeypatch: pytest.MonkeyPatch) -> None:
    def with_toy(group: str) -> list[Any]:
        extra = [_ToyEntryPoint()] if group == "dinoscope.augmentations" else []
        return [*entry_points(group=group), *extra]

    monkeypatch.setattr(pretrain_schema, "entry_points", with_toy)
    monkeypatch.setattr(photometric, "entry_points", with_toy)
    assert load_recipe(PretrainRecipe, TINY, ["crops.channel_mode=toy"]).crops.channel_mode == "toy"
    image = np.full((20, 20, 2), 51, dtype=np.uint8)  # 0.2 after scaling, doubled by the toy chain
    crops = MultiCropAugmentation(channel_mode="toy", mean=[0.0, 0.0], std=[1.0, 1.0], **SMALL)(image)
    assert np.allclose(crops["local_crops"][0].numpy(), 0.4)
    with pytest.raises(DinoscopeError) as info:
        MultiCropAugmentation(channel_mode="toy", gian=3.0)
    assert info.value.field == "gian" and "gain" in info.value.fix
    with pytest.raises(DinoscopeError, match="toy"):
        MultiCropAugmentation(channel_mode="hyperspectral")


def test_chain_options_belong_to_their_chain() -> None:
    with pytest.raises(DinoscopeError) as info:
        MultiCropAugmentation(channel_mode="rgb", channel_drop_prob=0.5)  # a fluorescence option
    assert info.value.field == "channel_drop_prob" and "none" in info.value.fix
    with pytest.raises(DinoscopeError) as info:
        MultiCropAugmentation(channel_mode="fluorescence", channel_drop_prob=1.5)
    assert info.value.field == "channel_drop_prob"
    chain = fluorescence_chain(ChainSettings(), channel_drop_prob=0.3)
    assert (chain.normalise, chain.vflip_prob, chain.per_crop) == (False, 0.5, ([], [], []))
    chain = multispectral_chain(ChainSettings(blur_probs=(0.0, 0.9, 0.5)))
    assert chain.normalise and chain.channels is None and [len(c) for c in chain.per_crop] == [1, 1, 1]


# ------------------------------------------------------------------------------------------ input paths
@dataclass
class _Calibration:
    flat_field_blob: str = input_path()  # an input whose name matches no naming rule
    lookup_tables: list[list[str]] = input_path(default_factory=list)


@dataclass
class _Predict:
    calibration: _Calibration = field(default_factory=_Calibration)
    model: str = input_path()
    hub_weights: str = input_path("https://example.org/w.pth")  # URLs are never checked
    # Written by the run, however input-like their names look: not declared, so never checked.
    output_path: str = "missing/out.tif"
    export_weights: str = "missing/teacher.safetensors"
    cache_dir: str = "missing/cache"
    source_raster: str = "missing/declared_nowhere.tif"


def test_input_paths_come_from_schema_metadata_not_key_names(tmp_path: Path) -> None:
    assert input_paths(_Predict()) == []  # nothing declared is set: nothing to check, outputs never
    blob, model = tmp_path / "flat.npz", tmp_path / "m.safetensors"
    recipe = _Predict(_Calibration(str(blob), [[str(tmp_path / "a.csv"), ""], [str(tmp_path / "b.csv")]]), str(model))
    assert input_paths(recipe) == [
        ("calibration.flat_field_blob", str(blob)),
        ("calibration.lookup_tables", str(tmp_path / "a.csv")),
        ("calibration.lookup_tables", str(tmp_path / "b.csv")),
        ("model", str(model)),
    ]
    with pytest.raises(DinoscopeError) as info:
        check_data_paths(recipe)
    assert info.value.field == "calibration.flat_field_blob"
    assert f"also missing: calibration.lookup_tables={tmp_path / 'a.csv'}" in str(info.value)
    for path in (blob, tmp_path / "a.csv", tmp_path / "b.csv", model):
        path.write_bytes(b"")
    check_data_paths(recipe)  # the outputs, the URL and the undeclared key do not exist and are not checked


def test_dataset_kinds_declare_their_input_parameters() -> None:
    assert ImageFolderDataset.input_params == ("root",)
    assert SyntheticShapesDataset.input_params == ()
    assert build_geotiff_dataset.input_params == ("paths",)
    assert build_cells_dataset.input_params == ("plates", "nuclei_table")
    for kind, factory in dataset_kinds().items():
        factory = factory.load() if hasattr(factory, "load") and not callable(factory) else factory
        declared = getattr(factory, "input_params", None)
        assert declared is not None, f"dataset kind {kind!r} declares no input_params"
        assert set(declared) <= set(inspect.signature(factory).parameters), kind


def test_dataset_params_are_checked_as_their_kind_declares(tmp_path: Path) -> None:
    missing = str(tmp_path / "none")
    recipe = load_recipe(PretrainRecipe, TINY, ["data.kind=image_folder", f"data.params.root={missing}"])
    with pytest.raises(DinoscopeError) as info:
        check_data_paths(recipe)
    assert info.value.field == "data.params.root"
    # The same keyword under a kind that does not declare it is not a path (synthetic shapes read no files).
    assert input_paths(PretrainRecipe(data=DataCfg(kind="synthetic_shapes", params={"root": missing}))) == []
    recipe = PretrainRecipe()
    recipe.eval.train = DataCfg(kind="cells", params={"plates": [missing, ""], "nuclei_table": missing, "seed": 1})
    assert input_paths(recipe) == [("eval.train.params.plates", missing), ("eval.train.params.nuclei_table", missing)]
    with pytest.raises(DinoscopeError) as info:
        input_paths(PretrainRecipe(data=DataCfg(kind="netcdf")))
    assert info.value.field == "data.kind" and "image_folder" in info.value.fix
