"""``dinoscope launch``: validation before anything starts (recipe and resources typos, data paths, run directory,
batch divisibility). Dry runs, SLURM and real runs are in ``test_launch_*.py``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.cli import main
from core.config.pretrain import PretrainRecipe
from core.errors import DinoscopeError
from core.launch import check_data_paths, plan_launch
from core.launch.kinds import CORE_KINDS, RecipeKind
from core.launch.resources import LaunchResources, load_resources, parse_time_minutes

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
TINY = RECIPES / "tiny" / "pretrain.yaml"
VITG = RECIPES / "cluster" / "pretrain_vitg14_16nodes.yaml"
VITG_RESOURCES = RECIPES / "launch" / "slurm_16nodes_8gpus.yaml"


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------------------------------ validation before start
def test_recipe_typo_fails_before_torch_loads_naming_the_closest_key(tmp_path: Path) -> None:
    """A typo is reported before the training stack (torch) is imported, so it fails at once (no timing asserted:
    the fact checked is that nothing heavy was loaded before the message)."""
    run = tmp_path / "run"
    argv = ["launch", str(TINY), "optim.bse_lr=0.1", "--launcher", "torchrun", "--nproc", "2", "--output-dir", str(run)]
    probe = (
        "import sys; from core.cli import main; status = main(sys.argv[1:]); "
        "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded'); sys.exit(status)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 2
    assert "optim.bse_lr" in proc.stderr and "did you mean optim.'base_lr'" in proc.stderr
    assert "torch not loaded" in proc.stdout
    assert not run.exists()


def test_typo_inside_recipe_file_names_file_line_and_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(TINY.read_text().replace("  base_lr: 0.001", "  base_lrr: 0.001"))
    err = _error(capsys, ["launch", str(recipe), "--dry-run"])
    line = recipe.read_text().splitlines().index("  base_lrr: 0.001") + 1
    assert f"{recipe}:{line}" in err and "optim.base_lrr" in err and "'base_lr'" in err


def test_wrong_type_and_unknown_kind_fail(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = _error(capsys, ["launch", str(TINY), "train.batch_size_per_rank=many", "--dry-run"])
    assert "wrong type for 'train.batch_size_per_rank'" in err
    recipe = tmp_path / "kind.yaml"
    recipe.write_text(TINY.read_text().replace("kind: pretrain", "kind: pretrian"))
    err = _error(capsys, ["launch", str(recipe), "--dry-run"])
    assert "unknown recipe kind 'pretrian'" in err and "'pretrain'" in err


def test_resources_typo_and_bad_values_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    res = tmp_path / "res.yaml"
    res.write_text("launcher: slurm\nnodse: 2\n")
    err = _error(capsys, ["launch", str(TINY), "--resources", str(res), "--dry-run"])
    assert "launch.nodse" in err and "'nodes'" in err and f"{res}:2" in err
    err = _error(capsys, ["launch", str(TINY), "launch.gpus_per_nod=8", "--dry-run"])
    assert "gpus_per_nod" in err and "'gpus_per_node'" in err
    with pytest.raises(DinoscopeError, match="wrong type for 'nodes'"):
        load_resources(None, ["nodes=many"])
    with pytest.raises(DinoscopeError, match="not a SLURM time limit"):
        load_resources(None, ["time=soon"])
    with pytest.raises(DinoscopeError, match="use one of"):
        load_resources(None, ["launcher=mpi"])
    with pytest.raises(DinoscopeError, match="use --launcher torchrun"):
        load_resources(None, ["nproc_per_node=2"])
    with pytest.raises(DinoscopeError, match="or --launcher slurm"):
        load_resources(None, ["launcher=deepspeed", "nodes=2"])
    with pytest.raises(DinoscopeError, match="--key=value or --flag"):
        load_resources(None, ["launcher=slurm", "time=10", "sbatch_extra=[exclusive]"])
    with pytest.raises(DinoscopeError, match="needs a time limit"):
        load_resources(None, ["launcher=slurm"])


@pytest.mark.parametrize(
    "text,minutes",
    [("90", 90), ("90:30", 91), ("72:00:00", 4320), ("2-00", 2880), ("1-12:30", 2190), ("3-00:00:00", 4320)],
)
def test_slurm_time_formats(text: str, minutes: int) -> None:
    assert parse_time_minutes(text) == minutes


def test_unquoted_yaml_time_is_kept_as_written(tmp_path: Path) -> None:
    res = tmp_path / "res.yaml"
    res.write_text("launcher: slurm\ntime: 72:00:00  # YAML 1.1 would read 259200\n")
    assert load_resources(res).time == "72:00:00"
    assert load_resources(res, ["time=1-00:00:00"]).time == "1-00:00:00"


def test_missing_data_path_fails_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    err = _error(
        capsys,
        [
            "launch",
            str(RECIPES / "geo" / "pretrain_vits14_zero2.yaml"),
            "--launcher",
            "torchrun",
            "--nproc",
            "2",
            "--output-dir",
            str(run),
        ],
    )
    assert "[data.params.paths]" in err and "data/geo/rgb_tiles" in err and "does not exist" in err
    assert not run.exists()
    err = _error(
        capsys,
        [
            "launch",
            str(RECIPES / "tiny" / "distill.yaml"),
            "distill.teacher_weights=" + str(tmp_path / "none.safetensors"),
            "--output-dir",
            str(run),
        ],
    )
    assert "[distill.teacher_weights]" in err and "none.safetensors" in err


def test_check_data_paths_accepts_files_dirs_and_globs_and_ignores_outputs(tmp_path: Path) -> None:
    from core.config import load_recipe

    (tmp_path / "a.tif").write_bytes(b"")
    ok = [
        f"data.params.paths=[{tmp_path / 'a.tif'},{tmp_path}/*.tif,{tmp_path}]",
        "data.kind=geotiff",
        f"train.output_dir={tmp_path / 'not' / 'yet'}",
    ]
    check_data_paths(load_recipe(PretrainRecipe, TINY, ok))
    # data.kind geotiff declares `paths` an input (synthetic_shapes, TINY's kind, reads no files)
    glob_recipe = [f"data.params.paths={tmp_path}/*.png", "data.kind=geotiff"]
    with pytest.raises(DinoscopeError, match=r"\*\.png' does not exist") as info:
        check_data_paths(load_recipe(PretrainRecipe, TINY, glob_recipe))
    assert info.value.field == "data.params.paths"
    with pytest.raises(DinoscopeError) as info:
        check_data_paths(load_recipe(PretrainRecipe, TINY, [f"model.pretrained={tmp_path / 'w.pth'}"]))
    assert info.value.field == "model.pretrained"


def test_run_dir_comes_from_the_cli_then_the_recipe_then_the_kind() -> None:
    from core.config import load_recipe
    from core.launch import resolve_run_dir

    recipe = load_recipe(PretrainRecipe, TINY)
    assert resolve_run_dir(recipe, "pretrain", TINY, "elsewhere") == Path("elsewhere")
    assert resolve_run_dir(recipe, "pretrain", TINY) == Path("runs/tiny/pretrain")
    nested = type("Embed", (), {"output": type("Output", (), {"dir": "runs/cells_embed"})()})()
    assert resolve_run_dir(nested, "cells_embed", "x/embed.yaml") == Path("runs/cells_embed")
    assert resolve_run_dir(object(), "canopy_predict", "x/hrch.yaml") == Path("runs/canopy_predict/hrch")


def test_global_batch_the_world_size_does_not_divide_fails(capsys: pytest.CaptureFixture) -> None:
    common = ["launch", str(VITG), "--resources", str(VITG_RESOURCES), "--dry-run"]
    err = _error(capsys, [*common, "--nodes", "10"])  # 80 ranks, global batch 1536
    assert "global batch size 1536 is not divisible by the world size 80" in err and "1520 or 1600" in err
    err = _error(capsys, [*common, "--nodes", "8"])  # 64 ranks: divisible, but 12 x 64 != 1536
    assert "train.batch_size_per_rank 12 x world size 64 = 768" in err
    assert "set train.batch_size_per_rank=24" in err
    assert (
        main(
            [
                "launch",
                str(VITG),
                "train.batch_size_per_rank=24",
                "--resources",
                str(VITG_RESOURCES),
                "--nodes",
                "8",
                "--dry-run",
            ]
        )
        == 0
    )
    with pytest.raises(DinoscopeError, match="not divisible by the world size 3"):
        plan_launch(TINY, [], LaunchResources(launcher="torchrun", nproc_per_node=3, global_batch_size=16))


def test_single_process_kind_refuses_several_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(CORE_KINDS, "pretrain", lambda: RecipeKind(PretrainRecipe, lambda r, d: 0, distributed=False))
    with pytest.raises(DinoscopeError, match="runs as a single process"):
        plan_launch(TINY, [], LaunchResources(launcher="torchrun", nproc_per_node=2))
    assert plan_launch(TINY, [], LaunchResources()).world_size == 1
