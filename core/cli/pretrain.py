"""Services behind ``dinoscope pretrain`` and ``dinoscope export`` (the sub-commands are declared in
:mod:`core.cli.commands`).

    dinoscope pretrain recipes/tiny/pretrain.yaml                              # laptop / CI
    torchrun --nproc_per_node=8 -m core.cli pretrain recipes/geo/pretrain_vitl14_zero2.yaml
    dinoscope export runs/tiny/pretrain out/backbone.safetensors
"""

from __future__ import annotations

import json
from pathlib import Path

from core.cli.adapter import Invocation
from core.config.commands import ExportCfg, PretrainOptions
from core.config.pretrain import PretrainRecipe
from core.distributed.env import is_main_process
from core.eval.periodic import periodic_knn
from core.train.export import export_run
from core.train.loop import train


def run_pretrain(recipe: PretrainRecipe, options: PretrainOptions, invocation: Invocation) -> int:
    """Train (or resume) ``recipe`` in ``--output-dir`` or ``train.output_dir``; prints the last metrics as JSON.

    A SIGTERM/SIGUSR2 stop raises :class:`~core.errors.TrainingInterrupted` after saving; :func:`core.cli.main`
    turns it into exit status 128 + signal.
    """
    run_dir = Path(options.output_dir or recipe.train.output_dir)
    last = train(
        recipe,
        run_dir,
        resume=not options.no_resume,
        allow_recipe_change=options.allow_recipe_change,
        recipe_path=invocation.recipe_path,
        overrides=invocation.overrides,
        evaluator=periodic_knn(recipe, run_dir),
    )
    if is_main_process():
        print(json.dumps({"run_dir": str(run_dir), **last}, indent=2))
    return 0


def run_export(cfg: ExportCfg, options: None, invocation: Invocation) -> int:
    """Write the run's teacher backbone (``--step`` or the latest checkpoint) as safetensors + JSON sidecar."""
    path = export_run(Path(cfg.run_dir), Path(cfg.out), step=None if cfg.step < 0 else cfg.step)
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0
