"""Typed recipe schemas and strict loading (OmegaConf is imported only when a recipe is loaded)."""

from __future__ import annotations

from core.lazy import lazy_exports

_EXPORTS = {
    "check_kwargs": "core.config.loader",
    "load_recipe": "core.config.loader",
    "to_yaml": "core.config.loader",
    "PretrainRecipe": "core.config.pretrain",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports("core.config", _EXPORTS)
