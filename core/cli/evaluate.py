"""Services behind ``dinoscope eval knn|linear WEIGHTS --kind KIND --train k=v ... --val k=v ...``.

dinoscope eval knn out/backbone.safetensors --kind image_folder --train root=data/train --val root=data/val
dinoscope eval linear out/backbone.safetensors --kind synthetic_shapes --train n=400 seed=1 --val n=200 seed=2
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.cli.adapter import Invocation
from core.config.commands import EvalCfg, KnnEvalCfg, LinearEvalCfg
from core.config.pretrain import DataCfg
from core.errors import DinoscopeError
from core.eval.knn import knn_evaluate
from core.eval.linear import linear_evaluate
from core.io import write_json
from core.ssl.build import build_data
from core.weights import load_backbone


def _check_size(cfg: EvalCfg, model: Any) -> None:
    if cfg.size % model.patch_size:
        p = model.patch_size
        raise DinoscopeError(
            f"size {cfg.size} is not a multiple of the backbone's patch size {p}",
            path=cfg.weights,
            field="size",
            fix=f"use a multiple of {p}, e.g. {max(p, cfg.size - cfg.size % p)}",
        )


def _datasets(cfg: EvalCfg) -> tuple[Any, Any]:
    train_set = build_data(DataCfg(kind=cfg.kind, params={**cfg.train, "labelled": True}))
    val_set = build_data(DataCfg(kind=cfg.kind, params={**cfg.val, "labelled": True}))
    return train_set, val_set


def _report(cfg: EvalCfg, protocol: str, result: dict) -> int:
    result = {"protocol": protocol, "weights": str(cfg.weights), **result}
    if cfg.out:
        write_json(Path(cfg.out), result)
    print(json.dumps(result, indent=2, default=str))
    return 0


def run_knn(cfg: KnnEvalCfg, options: None, invocation: Invocation) -> int:
    """Weighted kNN accuracy of the frozen backbone's class tokens for every k of ``cfg.k``."""
    model, meta = load_backbone(cfg.weights)
    _check_size(cfg, model)
    train_set, val_set = _datasets(cfg)
    result = knn_evaluate(model, train_set, val_set, ks=list(cfg.k), size=cfg.size, mean=meta.mean, std=meta.std)
    return _report(cfg, "knn", result)


def run_linear(cfg: LinearEvalCfg, options: None, invocation: Invocation) -> int:
    """Held-out accuracy of linear probes on the frozen backbone's features (lr grid, best on validation)."""
    model, meta = load_backbone(cfg.weights)
    _check_size(cfg, model)
    train_set, val_set = _datasets(cfg)
    result = linear_evaluate(
        model,
        train_set,
        val_set,
        n_last_blocks=cfg.n_last_blocks,
        epochs=cfg.epochs,
        size=cfg.size,
        mean=meta.mean,
        std=meta.std,
    )
    return _report(cfg, "linear", result)
