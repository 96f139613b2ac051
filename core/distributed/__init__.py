"""Distributed execution: rank layout, collectives and training strategies.

Names are imported lazily (PEP 562): the rank layout (:mod:`core.distributed.layout`) is torch-free, so launch
planning can read it without loading torch. Importing this package never imports ``deepspeed``;
``build_strategy("deepspeed")`` loads :mod:`core.distributed.deepspeed_strategy` on demand.
"""

from __future__ import annotations

from core.lazy import lazy_exports

_EXPORTS = {
    "DistEnv": "core.distributed.layout",
    "all_reduce_mean": "core.distributed.env",
    "barrier": "core.distributed.env",
    "get_rank": "core.distributed.env",
    "get_world_size": "core.distributed.env",
    "init_distributed": "core.distributed.env",
    "is_main_process": "core.distributed.env",
    "shutdown_distributed": "core.distributed.env",
    "STRATEGIES": "core.distributed.strategy",
    "SingleProcessStrategy": "core.distributed.strategy",
    "Strategy": "core.distributed.strategy",
    "build_strategy": "core.distributed.strategy",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports("core.distributed", _EXPORTS)
