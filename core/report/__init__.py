"""Reports people read: self-contained HTML pages (every image a data URI), tables, captions and definitions.

* :mod:`core.report.html`: page building blocks (stylesheet, sections, tables, figures, definition lists).
* :mod:`core.report.baselines`: fair baselines of a pretrained backbone (random-init twin, fixed statistics, kNN
  on pixels), written as ordinary weights files and result tables.
* :mod:`core.report.figures`: the report's own figures.
* :mod:`core.report.demo_page`: ``dinoscope demo``'s page, :func:`write_demo_report`.
"""

from core.report.demo_page import write_demo_report

__all__ = ["write_demo_report"]
