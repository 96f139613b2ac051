"""Every recipe under recipes/ validates against its kind's schema; every launch resource file validates; the shipped
cluster recipes fit their resource files (world size x per-rank batch = global batch). No data files are needed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from core.config import load_recipe
from core.launch import input_paths, plan_launch, resolve_run_dir
from core.launch.kinds import get_kind, recipe_kind_of
from core.launch.resources import LAUNCHERS, load_resources

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
LAUNCH = RECIPES / "launch"

# Shipped recipe -> the resource file it is documented with (recipes/README.md).
PAIRS = {
    "geo/pretrain_vits14_zero2.yaml": "slurm_1node_8gpus.yaml",
    "geo/pretrain_vitl14_zero2.yaml": "slurm_4nodes_8gpus.yaml",
    "cluster/pretrain_vitg14_16nodes.yaml": "slurm_16nodes_8gpus.yaml",
    "cluster/distill_vitl14_to_vits14.yaml": "slurm_4nodes_8gpus.yaml",
}
SHIPPED = [*PAIRS, "tiny/distill.yaml"]
# Recipe -> the keys `dinoscope launch` checks for existence: schema fields marked input_path, and the data.params a
# dataset kind lists in its factory's input_params. Nothing else, whatever a key is called.
INPUT_KEYS = {
    "bench/gpu_vitl14.yaml": set(),
    "bio/cells_embed_vits8.yaml": {"data.sources", "data.nuclei_table", "model.weights"},
    "bio/pretrain_channel_adaptive_vits.yaml": {"data.params.plates", "data.params.nuclei_table"},
    "cluster/distill_vitl14_to_vits14.yaml": {"data.params.paths", "distill.teacher_weights"},
    "cluster/pretrain_vitg14_16nodes.yaml": {"data.params.paths"},
    "geo/canopy_fit_vitl14.yaml": {"data.pairs", "backbone.weights"},
    "geo/canopy_predict_hrch.yaml": {"model", "inputs"},
    "geo/pretrain_vitl14_zero2.yaml": {"data.params.paths"},
    "geo/pretrain_vits14_zero2.yaml": {"data.params.paths"},
    "tiny/canopy_fit.yaml": set(),
    "tiny/canopy_predict.yaml": {"model", "inputs"},
    "tiny/cells_embed.yaml": {"data.sources", "data.nuclei_table", "model.weights"},
    "tiny/cells_pretrain.yaml": {"data.params.plates", "data.params.nuclei_table"},
    "tiny/cells_profile.yaml": {"run", "platemap"},
    "tiny/distill.yaml": {"distill.teacher_weights"},
    "tiny/geo_pretrain.yaml": {"data.params.paths"},
    "tiny/pretrain.yaml": set(),
}


def _yaml_files(folder: Path) -> list[Path]:
    return sorted([*folder.rglob("*.yaml"), *folder.rglob("*.yml")])


def _recipe_files() -> list[Path]:
    return [p for p in _yaml_files(RECIPES) if LAUNCH not in p.parents]


def _first_key(path: Path) -> str | None:
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.split(":", 1)[0].strip()
    return None


@pytest.mark.parametrize("path", _recipe_files(), ids=lambda p: str(p.relative_to(RECIPES)))
def test_recipe_validates_against_its_kind(path: Path) -> None:
    assert _first_key(path) == "kind", "a recipe starts with `kind: <name>`"
    kind_name = recipe_kind_of(path)
    kind = get_kind(kind_name, path)  # an unknown kind raises, naming the valid ones
    recipe = load_recipe(kind.schema, path)
    assert isinstance(recipe, kind.schema) and dataclasses.is_dataclass(recipe)
    assert kind_name == yaml.safe_load(path.read_text())["kind"]


@pytest.mark.parametrize("name,keys", sorted(INPUT_KEYS.items()))
def test_recipe_inputs_are_the_declared_keys(name: str, keys: set[str]) -> None:
    path = RECIPES / name
    assert path.exists(), f"{name} is gone: drop it from INPUT_KEYS"
    kind_name = recipe_kind_of(path)
    recipe = load_recipe(get_kind(kind_name, path).schema, path)
    found = input_paths(recipe)
    assert {key for key, _ in found} == keys
    # What a run writes is never an input, although e.g. cells_profile's `run` (an input) is a run directory.
    assert str(resolve_run_dir(recipe, kind_name, path)) not in {value for _, value in found}


@pytest.mark.parametrize("path", _yaml_files(LAUNCH), ids=lambda p: p.name)
def test_launch_resource_file_validates(path: Path) -> None:
    resources = load_resources(path)
    assert resources.launcher in LAUNCHERS
    assert resources.world_size >= 1
    if resources.launcher == "slurm" and resources.cluster == "slurm":
        assert resources.time, "a SLURM resource file sets a time limit"


@pytest.mark.parametrize("recipe,resources", sorted(PAIRS.items()))
def test_cluster_recipe_fits_its_resources(recipe: str, resources: str) -> None:
    res = load_resources(LAUNCH / resources)
    plan = plan_launch(RECIPES / recipe, [], res, check_paths=False)
    assert plan.world_size == res.nodes * res.gpus_per_node
    assert plan.recipe.train.batch_size_per_rank * plan.world_size == res.global_batch_size
    assert plan.recipe.dist.strategy == "deepspeed"


def test_vitg_recipe_is_zero2_on_16_nodes_of_8_gpus() -> None:
    """ZeRO-2, as bench/zero_arithmetic.py's memory and communication figures favour (recipes/README.md)."""
    plan = plan_launch(
        RECIPES / "cluster/pretrain_vitg14_16nodes.yaml",
        [],
        load_resources(LAUNCH / "slurm_16nodes_8gpus.yaml"),
        check_paths=False,
    )
    assert (plan.recipe.model.arch, plan.recipe.model.patch_size, plan.recipe.dist.zero_stage) == ("vit_giant2", 14, 2)
    assert (plan.resources.nodes, plan.resources.gpus_per_node, plan.world_size) == (16, 8, 128)
    dist = plan.recipe.dist
    assert (dist.grad_accum, dist.overlap_comm, dist.offload, plan.recipe.train.precision) == (1, True, False, "bf16")


def test_vitg_zero_stage_follows_the_arithmetic_and_the_readme_table_is_current() -> None:
    """bench/zero_arithmetic.py on the shipped recipe: ZeRO-2 fits with room for activations and sends less than
    ZeRO-3 (whose EMA teacher update gathers the whole student every step); recipes/README.md shows today's table."""
    import importlib.util

    # bench/ is a folder of scripts, not a package: load the module from its file.
    spec = importlib.util.spec_from_file_location("bench_zero_arithmetic", ROOT / "bench" / "zero_arithmetic.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.arithmetic(load_recipe(get_kind("pretrain").schema, bench.DEFAULT_RECIPE), 128)
    zero2, zero3 = (result["stages"][k]["communication_per_step"] for k in ("zero2", "zero3"))
    assert 1.1e9 < result["params"]["student"] == result["params"]["teacher"] < 1.4e9
    # of 80 GB per GPU: the rest is for the activations
    assert result["stages"]["zero2"]["memory_bytes"]["total_without_activations"] < 16 * 2**30
    assert zero2["total"]["psi"] == 2.0 and zero2["ema_gather"]["elements"] == 0
    assert zero3["ema_gather"]["psi"] > 0.99 and zero3["total"]["bytes"] > zero2["total"]["bytes"]
    assert bench.markdown(result) in (RECIPES / "README.md").read_text(), (
        "rerun python bench/zero_arithmetic.py --markdown and paste the table into recipes/README.md"
    )


def test_distill_recipes_name_a_teacher() -> None:
    for name in ("cluster/distill_vitl14_to_vits14.yaml", "tiny/distill.yaml"):
        recipe = load_recipe(get_kind("distill").schema, RECIPES / name)
        assert recipe_kind_of(RECIPES / name) == "distill" and recipe.distill.teacher_weights.endswith(".safetensors")


def test_readme_lists_the_shipped_recipes_and_resource_files() -> None:
    readme = (RECIPES / "README.md").read_text()
    for name in [*SHIPPED, "tiny/pretrain.yaml", *(f"launch/{p.name}" for p in _yaml_files(LAUNCH))]:
        assert name in readme, f"recipes/README.md does not mention {name}"
    for entry in (
        "config.yaml",
        "run_info.json",
        "metrics.jsonl",
        "loss_curve.png",
        "checkpoints/",
        "latest",
        "eval_knn.jsonl",
        "launch.json",
    ):
        assert entry in readme
