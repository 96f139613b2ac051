"""Periodic kNN of the teacher during pretraining (DINOv2 evaluates its teacher by weighted kNN on frozen class
tokens, Wu et al. 2018 / Caron et al. 2021), computed and written once, by rank 0, and shared with every rank.

The training loop takes the evaluator as an argument (``core.train.loop.train(..., evaluator=...)``), so training
never imports evaluation; the CLI and the recipe kind build it with :func:`periodic_knn`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from core.config.pretrain import PretrainRecipe
from core.eval.knn import knn_evaluate
from core.logging import JsonlLogger
from core.ssl.build import build_data
from core.train.session import EVAL_FILE, broadcast_object, is_main_rank

Evaluator = Callable[[torch.nn.Module, int], dict[str, float]]


def periodic_knn(recipe: PretrainRecipe, run_dir: str | Path) -> Evaluator | None:
    """The evaluator for ``recipe.eval`` (None when it is off). Datasets load on the first call, on rank 0 only,
    so building it has no side effect before the run directory is validated."""
    if not (recipe.eval.every and recipe.eval.train and recipe.eval.val):
        return None
    cache: dict[str, Any] = {}
    mean, std = recipe.crops.mean or None, recipe.crops.std or None

    def evaluate(backbone: torch.nn.Module, iteration: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if is_main_rank():
            if not cache:
                cache["train"], cache["val"] = build_data(recipe.eval.train), build_data(recipe.eval.val)
            result = knn_evaluate(
                backbone,
                cache["train"],
                cache["val"],
                ks=list(recipe.eval.ks),
                size=recipe.crops.global_crops_size,
                mean=mean,
                std=std,
            )
            metrics = {f"knn/top1_k{k}": v for k, v in result["top1"].items()}
            JsonlLogger(Path(run_dir) / EVAL_FILE).log(iteration=iteration, **metrics)
        return broadcast_object(metrics)

    return evaluate
