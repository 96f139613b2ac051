"""`dinoscope cells` sub-commands (placeholder until the domain commands land)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this package's sub-commands to the `dinoscope` parser."""
