"""Services behind ``dinoscope weights inspect PATH`` and ``dinoscope weights convert PATH OUT``."""

from __future__ import annotations

import json
from typing import Any

from core.cli.adapter import Invocation
from core.config.commands import WeightsCfg, WeightsConvertCfg
from core.errors import DinoscopeError
from core.weights import load_backbone, save_backbone


def _load(cfg: WeightsCfg) -> tuple[Any, Any]:
    overrides = {"num_heads": cfg.num_heads} if cfg.num_heads else {}
    return load_backbone(
        cfg.path,
        format=cfg.format or None,
        branch=cfg.branch,
        in_chans=cfg.in_chans or None,
        channel_strategy=cfg.channel_strategy,
        channel_names=list(cfg.channel_names) or None,
        mean=list(cfg.mean) or None,
        std=list(cfg.std) or None,
        **overrides,
    )


def run_inspect(cfg: WeightsCfg, options: None, invocation: Invocation) -> int:
    """Print architecture, channels, normalisation and format of the weights at ``cfg.path``."""
    model, meta = _load(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    report = {
        "path": str(cfg.path),
        "format": meta.source_format,
        "arch": meta.arch,
        "patch_size": meta.patch_size,
        "embed_dim": meta.embed_dim,
        "depth": model.n_blocks,
        "num_heads": model.num_heads,
        "in_chans": meta.in_chans,
        "num_register_tokens": meta.num_register_tokens,
        "channel_adaptive": meta.channel_adaptive,
        "channel_names": meta.channel_names,
        "mean": meta.mean,
        "std": meta.std,
        "format_version": meta.format_version,
        "parameters": n_params,
        "tensors": len(model.state_dict()),
        "model_kwargs": meta.model_kwargs,
        "extra": meta.extra,
    }
    if cfg.json:
        print(json.dumps(report, indent=2))
        return 0
    width = max(len(k) for k in report)
    for key, value in report.items():
        if key == "parameters":
            value = f"{value:,}"
        print(f"{key:<{width}}  {value}")
    return 0


def run_convert(cfg: WeightsConvertCfg, options: None, invocation: Invocation) -> int:
    """Write the weights at ``cfg.path`` as dinoscope's export (safetensors + JSON sidecar with the metadata)."""
    if not str(cfg.out).endswith(".safetensors"):
        raise DinoscopeError(
            "the output must end in .safetensors",
            path=cfg.out,
            field="out",
            fix="e.g. dinoscope weights convert in.pth out/model.safetensors",
        )
    model, meta = _load(cfg)
    path = save_backbone(model, meta, cfg.out)
    print(
        f"wrote {path} and {path.with_suffix('.json')} ({meta.arch}, {meta.in_chans} channels, "
        f"from {meta.source_format})"
    )
    return 0
