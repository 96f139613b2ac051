"""Does SSL learn? kNN accuracy of the tiny recipe's backbone after pretraining vs the same architecture at random
init, on held-out labelled synthetic shapes (4 classes). Prints JSON.

    python bench/ssl_knn.py [--iters 300] [--out runs/ssl_knn]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(iters: int, out: Path, seed: int = 0) -> dict:
    from core.config import PretrainRecipe, load_recipe
    from core.data import SyntheticShapesDataset
    from core.eval.knn import knn_evaluate
    from core.ssl.build import build_student_teacher
    from core.train.loop import train

    overrides = [
        f"train.max_iters={iters}",
        f"train.checkpoint_every={iters}",
        f"train.seed={seed}",
        f"optim.warmup_epochs={max(iters // 10, 1) / 100}",
    ]
    recipe = load_recipe(PretrainRecipe, ROOT / "recipes" / "tiny" / "pretrain.yaml", overrides)
    torch.manual_seed(seed)
    random_backbone, _ = build_student_teacher(recipe.model)
    t0 = time.perf_counter()
    train(recipe, out, resume=False)
    seconds = time.perf_counter() - t0
    from core.train.checkpoint import consolidated_teacher_state_dict, find_latest

    teacher = consolidated_teacher_state_dict(find_latest(out))
    trained, _ = build_student_teacher(recipe.model)
    trained.load_state_dict({k[len("backbone.") :]: v for k, v in teacher.items() if k.startswith("backbone.")})
    train_set = SyntheticShapesDataset(n=400, size=48, seed=101, labelled=True)
    val_set = SyntheticShapesDataset(n=200, size=48, seed=202, labelled=True)
    common = dict(ks=[10, 20], size=recipe.crops.global_crops_size)
    return {
        "iterations": iters,
        "train_seconds": round(seconds, 1),
        "knn_top1_random_init": knn_evaluate(random_backbone, train_set, val_set, **common)["top1"],
        "knn_top1_pretrained": knn_evaluate(trained, train_set, val_set, **common)["top1"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--out", default=str(ROOT / "runs" / "ssl_knn"))
    args = parser.parse_args()
    print(json.dumps(run(args.iters, Path(args.out)), indent=2))


if __name__ == "__main__":
    main()
