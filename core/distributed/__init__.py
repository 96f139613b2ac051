"""Distributed execution: rank layout, collectives and training strategies.

Importing this package never imports ``deepspeed``; ``build_strategy("deepspeed")`` loads
:mod:`core.distributed.deepspeed_strategy` on demand.
"""

from __future__ import annotations

from core.distributed.env import (
    DistEnv,
    all_reduce_mean,
    barrier,
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    shutdown_distributed,
)
from core.distributed.strategy import STRATEGIES, SingleProcessStrategy, Strategy, build_strategy

__all__ = [
    "STRATEGIES",
    "DistEnv",
    "SingleProcessStrategy",
    "Strategy",
    "all_reduce_mean",
    "barrier",
    "build_strategy",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_main_process",
    "shutdown_distributed",
]
