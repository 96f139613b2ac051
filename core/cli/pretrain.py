"""``dinoscope pretrain RECIPE [key=value ...]`` and ``dinoscope export RUN_DIR OUT``.

dinoscope pretrain recipes/tiny/pretrain.yaml                              # laptop / CI
torchrun --nproc_per_node=8 -m core.cli pretrain recipes/geo/pretrain_vitl14_zero2.yaml
dinoscope export runs/tiny/pretrain out/backbone.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from core.config import PretrainRecipe, load_recipe
    from core.distributed.env import is_main_process
    from core.eval.periodic import periodic_knn
    from core.train.loop import train

    recipe = load_recipe(PretrainRecipe, args.recipe, args.overrides)
    run_dir = Path(args.output_dir or recipe.train.output_dir)
    # A SIGTERM/SIGUSR2 stop raises TrainingInterrupted after saving; core.cli.main turns it into exit 128 + signal.
    last = train(
        recipe,
        run_dir,
        resume=not args.no_resume,
        allow_recipe_change=args.allow_recipe_change,
        recipe_path=args.recipe,
        overrides=list(args.overrides),
        evaluator=periodic_knn(recipe, run_dir),
    )
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
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="start from scratch; refused when the run directory already holds checkpoints",
    )
    p.add_argument(
        "--allow-recipe-change",
        action="store_true",
        help="resume although the recipe differs from the checkpoint's (recorded in recipe_changes.jsonl)",
    )
    p.set_defaults(func=cmd_pretrain)
    e = subparsers.add_parser("export", help="write a run's teacher backbone as safetensors + JSON sidecar")
    e.add_argument("run_dir")
    e.add_argument("out", help="output .safetensors path")
    e.add_argument("--step", type=int, help="checkpoint iteration (default: latest)")
    e.set_defaults(func=cmd_export)
