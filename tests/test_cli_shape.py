"""Every ``dinoscope`` sub-command has one shape (``core.cli.adapter``): flags from its schema, ``--recipe FILE``,
``--set``, trailing ``key=value`` overrides and ``--print-recipe``.

The walk starts from the real parser, so a new sub-command without an entry in :data:`CASES` fails here."""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from bio.cli import CELLS_COMMANDS
from core.cli import build_parser, commands, main
from core.cli.adapter import Command, command_args
from geodino.cli import CANOPY_COMMANDS

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny" / "pretrain.yaml")

# sub-command -> (minimal arguments, a trailing override, the dotted key it sets, the value expected)
CASES: dict[str, tuple[list[str], str, str, Any]] = {
    "pretrain": ([TINY], "optim.epochs=3", "optim.epochs", 3),
    "export": (["run", "out.safetensors"], "step=5", "step", 5),
    "eval knn": (["w.safetensors", "--train", "root=a"], "size=112", "size", 112),
    "eval linear": (["w.safetensors"], "epochs=3", "epochs", 3),
    "launch": ([TINY, "--launcher", "torchrun", "--nproc", "2"], "optim.epochs=3", "optim.epochs", 3),
    "weights inspect": (["w.pth"], "branch=student", "branch", "student"),
    "weights convert": (["w.pth", "o.safetensors"], "in_chans=5", "in_chans", 5),
    "demo": ([], "quick=true", "quick", True),
    "canopy synth": (["out"], "size=64", "size", 64),
    "canopy fit": ([str(ROOT / "recipes" / "tiny" / "canopy_fit.yaml")], "optim.epochs=2", "optim.epochs", 2),
    "canopy predict": (["a.tif", "--model", "m.safetensors", "--out", "o.tif"], "tile=128", "tile", 128),
    "canopy evaluate": (["p.tif", "r.tif", "--out", "e"], "block=20", "block", 20),
    "canopy zonal": (["r.tif", "p.gpkg", "o.gpkg"], "band=2", "band", 2),
    "canopy inspect": (["r.tif", "--model", "m.safetensors"], "input_range=auto", "input_range", "auto"),
    "cells synth": (["out"], "plates=3", "plates", 3),
    "cells embed": (["p.zarr", "--weights", "w.pth"], "model.batch_size=8", "model.batch_size", 8),
    "cells fit-head": (["run", "--platemap", "p.csv", "--out", "h"], "epochs=5", "epochs", 5),
    "cells profile": (["run", "--platemap", "p.csv", "--out", "p.parquet"], "level=treatment", "level", "treatment"),
    "cells evaluate": (["p.parquet", "--out", "e"], "knn_k=3", "knn_k", 3),
    "curate embed": (["photos", "--weights", "w.pth"], "batch_size=8", "batch_size", 8),
    "curate dedup": (["pool.npy", "--threshold", "0.9"], "method=ivf", "method", "ivf"),
    "curate retrieve": (["pool.npy", "--queries", "q.npy"], "k=8", "k", 8),
    "curate cluster": (["pool.npy", "--levels", "20,5"], "iters=3", "iters", 3),
    "curate sample": (["pool.npy", "--clusters", "c", "--size", "10"], "seed=3", "seed", 3),
}


def _leaves(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[str]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [" ".join(prefix)]
    return [leaf for name, child in subs[0].choices.items() for leaf in _leaves(child, (*prefix, name))]


def _at(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def test_every_sub_command_has_a_case() -> None:
    assert sorted(_leaves(build_parser())) == sorted(CASES)


@pytest.mark.parametrize("command", sorted(CASES))
def test_every_sub_command_takes_trailing_overrides_and_prints_its_recipe(
    command: str, capsys: pytest.CaptureFixture
) -> None:
    args, override, key, expected = CASES[command]
    assert main([*command.split(), *args, "--print-recipe", override]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert _at(printed, key) == expected


def test_flags_override_the_recipe_file_and_set_items_override_flags(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "predict.yaml"
    recipe.write_text("model: m.safetensors\ninputs: [a.tif]\nout: o.tif\ntile: 300\noverlap: 32\n")
    base = ["canopy", "predict", "--recipe", str(recipe), "--print-recipe"]
    assert main([*base, "--tile", "400"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["tile"] == 400
    assert main([*base, "--tile", "400", "--set", "tile=500"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["tile"] == 500 and printed["overlap"] == 32 and printed["inputs"] == ["a.tif"]


def test_positionals_and_overrides_may_be_mixed(capsys: pytest.CaptureFixture) -> None:
    argv = ["canopy", "predict", "a.tif", "tile=128", "b.tif", "--model", "m", "--out", "d", "--print-recipe"]
    assert main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["inputs"] == ["a.tif", "b.tif"] and printed["tile"] == 128


def test_list_and_switch_flags_set_their_keys(capsys: pytest.CaptureFixture) -> None:
    argv = ["cells", "embed", "p.zarr", "--weights", "w", "--channels", "DNA,RNA", "--float16", "--no-resume"]
    assert main([*argv, "--print-recipe"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["channels"] == ["DNA", "RNA"]
    assert printed["output"]["dtype"] == "float16" and printed["output"]["resume"] is False


def test_an_unknown_key_lists_the_valid_ones(capsys: pytest.CaptureFixture) -> None:
    assert main(["canopy", "zonal", "r.tif", "p.gpkg", "o.gpkg", "bnd=2"]) == 2
    err = capsys.readouterr().err
    assert "bnd" in err and "did you mean 'band'" in err and "cover_threshold" in err


def test_a_value_outside_its_declared_range_names_the_key(capsys: pytest.CaptureFixture) -> None:
    assert main(["canopy", "predict", "a.tif", "--model", "m", "--out", "o.tif", "batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert "[batch_size]" in err and "outside its range" in err and "from 1" in err


def test_help_shows_the_schema_default(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["canopy", "predict", "--help"])
    assert "tile side in pixels (default: 256)" in " ".join(capsys.readouterr().out.split())


def test_launch_prints_the_recipe_and_the_resources_its_flags_set(capsys: pytest.CaptureFixture) -> None:
    argv = ["launch", TINY, "--launcher", "torchrun", "--nproc", "2", "--print-recipe", "launch.job_name=x"]
    assert main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["launch"]["nproc_per_node"] == 2 and printed["launch"]["launcher"] == "torchrun"
    assert printed["launch"]["job_name"] == "x" and "optim" in printed


UNBOUNDED = {"seed", "mean"}  # any integer seeds a generator; a channel mean may be any real number


def _numeric(tp: Any) -> bool:
    if typing.get_origin(tp) is list:
        tp = (typing.get_args(tp) or (None,))[0]
    return tp in (int, float)


def test_every_numeric_option_declares_its_range() -> None:
    missing = []
    for group in _command_groups():
        for command in group:
            for arg in command_args(command):
                spec = arg.spec
                bounds = (spec.minimum, spec.maximum, spec.above, spec.below)
                if (
                    _numeric(arg.type)
                    and all(b is None for b in bounds)
                    and arg.key.rpartition(".")[2] not in UNBOUNDED
                ):
                    missing.append(f"{command.name}: {arg.key}")
    assert not missing, missing


def _command_groups() -> list[tuple[Command, ...]]:
    return [
        (commands.PRETRAIN, commands.EXPORT, commands.LAUNCH, commands.DEMO),
        commands.EVAL,
        commands.WEIGHTS,
        getattr(commands, "CURATE", ()),
        CANOPY_COMMANDS,
        CELLS_COMMANDS,
    ]
