"""Typed recipe schemas and strict loading."""

from core.config.loader import check_kwargs, load_recipe, to_yaml
from core.config.pretrain import PretrainRecipe

__all__ = ["PretrainRecipe", "check_kwargs", "load_recipe", "to_yaml"]
