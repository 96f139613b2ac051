"""Typed recipe schemas and strict loading (OmegaConf is imported only when a recipe is loaded)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "check_kwargs": "core.config.loader",
    "load_recipe": "core.config.loader",
    "to_yaml": "core.config.loader",
    "PretrainRecipe": "core.config.pretrain",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'core.config' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
