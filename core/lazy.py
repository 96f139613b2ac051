"""Lazy package exports: a package lists ``name -> module`` and imports each module only when a name is used,
so optional heavy stacks (albumentations, OmegaConf) load on use and ``import core`` stays fast."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package`` that resolves ``exports`` on first access."""

    def __getattr__(name: str) -> Any:  # noqa: N807 - PEP 562 requires this name for a module attribute hook
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__
