"""``dinoscope pretrain RECIPE [key=value ...]`` and ``dinoscope export RUN_DIR OUT``.

    dinoscope pretrain recipes/tiny/pretrain.yaml                              # laptop / CI
    torchrun --nproc_per_node=8 -m core.cli pretrain recipes/geo/pretrain_vitl14_zero2.yaml
    dinoscope export runs/tiny/pretrain out/backbone.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parents[2])
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_info(run_dir: Path, recipe_path: str | None, overrides: list[str]) -> None:
    """Resolved-recipe companions: git commit, package versions and hardware, for reproducibility."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from core.io import write_json

    versions = {}
    for pkg in ("dinoscope", "torch", "numpy", "deepspeed", "xformers", "rasterio", "zarr"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    write_json(run_dir / "run_info.json", {
        "recipe": recipe_path, "overrides": overrides, "git_commit": _git_commit(), "argv": sys.argv,
        "versions": versions, "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]})


def cmd_pretrain(args: argparse.Namespace) -> int:
    from core.config import PretrainRecipe, load_recipe, to_yaml
    from core.dist.env import is_main_process
    from core.io import atomic_path
    from core.train.loop import train

    recipe = load_recipe(PretrainRecipe, args.recipe, args.overrides)
    run_dir = Path(args.output_dir or recipe.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        with atomic_path(run_dir / "config.yaml") as tmp:
            tmp.write_text(to_yaml(recipe))
        write_run_info(run_dir, args.recipe, args.overrides)
    last = train(recipe, run_dir, resume=not args.no_resume)
    if is_main_process():
        print(json.dumps({"run_dir": str(run_dir), **last}, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from core.train.export import export_run

    path = export_run(Path(args.run_dir), Path(args.out), step=args.step)
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pretrain", help="DINOv2 self-supervised pretraining (or distillation) from a recipe")
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.base_lr=1e-3")
    p.add_argument("--output-dir", help="run directory (default: train.output_dir)")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in the run directory")
    p.set_defaults(func=cmd_pretrain)
    e = subparsers.add_parser("export", help="write a run's teacher backbone as safetensors + JSON sidecar")
    e.add_argument("run_dir")
    e.add_argument("out", help="output .safetensors path")
    e.add_argument("--step", type=int, help="checkpoint iteration (default: latest)")
    e.set_defaults(func=cmd_export)
