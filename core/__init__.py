"""dinoscope core: DINOv2 backbones, losses, training engine and evaluation.

``core`` is domain-free: it never imports :mod:`geodino` or :mod:`bio`. Domain packages plug their datasets and
CLI commands in through the entry-point groups ``dinoscope.datasets`` and ``dinoscope.commands``.
"""

__version__ = "0.1.0"
