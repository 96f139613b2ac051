"""Building blocks of a self-contained HTML page: a small stylesheet, sections, tables, figures as data URIs.

Everything a page shows is inside the one file: images are embedded as ``data:image/png;base64,...`` URIs, so the
page can be mailed, attached to a ticket or opened from an archive without the folder it was written in. Text is
escaped here; callers pass plain strings (and :class:`Raw` for markup they built with these helpers).
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

STYLE = """
:root { --ink: #1d2329; --muted: #5b6670; --line: #d9dee3; --accent: #1f6f8b; --good: #1e7b34; --bad: #a33a1f; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       max-width: 1100px; margin: 0 auto; padding: 1.5em 1.2em 4em; }
h1 { font-size: 1.7em; margin: 0 0 .2em; }
h2 { font-size: 1.3em; margin: 2em 0 .5em; padding-top: .6em; border-top: 2px solid var(--line); }
h3 { font-size: 1.05em; margin: 1.4em 0 .4em; }
p, li { max-width: 75ch; }
.lead { color: var(--muted); margin-top: 0; }
nav a { margin-right: 1em; }
a { color: var(--accent); }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: .93em; }
th, td { padding: .3em .7em; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: #f3f5f7; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.best td { background: #eef7f0; }
code, pre { font: .88em/1.4 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
pre { background: #f6f8fa; padding: .6em .8em; overflow-x: auto; white-space: pre-wrap; word-break: break-word; }
td code { word-break: break-all; }
.figures { display: flex; flex-wrap: wrap; gap: 1.2em; }
figure { margin: .4em 0; flex: 1 1 420px; max-width: 520px; }
figure img { width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { font-size: .88em; color: var(--muted); margin-top: .3em; }
dl.defs { display: grid; grid-template-columns: max-content 1fr; gap: .2em 1em; font-size: .9em;
          background: #f8f9fa; padding: .6em .9em; border-left: 3px solid var(--accent); }
dl.defs dt { font-weight: 600; }
dl.defs dd { margin: 0; }
.verdict { padding: .5em .9em; border-left: 4px solid var(--accent); background: #f3f8fa; max-width: 75ch; }
.verdict.win { border-color: var(--good); background: #f1f8f2; }
.verdict.loss { border-color: var(--bad); background: #fbf3f0; }
.note { color: var(--muted); font-size: .9em; }
table.timings td:nth-child(2) { min-width: 16em; }
table.timings td:nth-child(5) { white-space: nowrap; }
table.timings td:last-child { font-size: .85em; }
"""


class Raw(str):
    """Markup that is already safe (built by these helpers): inserted as is."""


def esc(value: object) -> str:
    """``value`` as escaped text (a :class:`Raw` string stays as it is)."""
    return value if isinstance(value, Raw) else html.escape(str(value))


def data_uri(png: str | os.PathLike | bytes) -> str:
    """A ``data:image/png;base64`` URI of a PNG file (or of its bytes)."""
    data = png if isinstance(png, bytes) else Path(png).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


@dataclass
class Figure:
    """A picture with its caption: what it shows and how to read it."""

    png: Path
    title: str
    caption: str


def figures(items: Iterable[Figure]) -> Raw:
    """Figures side by side (wrapping); missing files are left out."""
    parts = [
        f"<figure><img src='{data_uri(f.png)}' alt='{esc(f.title)}'>"
        f"<figcaption><b>{esc(f.title)}.</b> {esc(f.caption)}</figcaption></figure>"
        for f in items
        if f.png.is_file()
    ]
    return Raw(f"<div class='figures'>{''.join(parts)}</div>") if parts else Raw("")


def fmt(value: object, digits: int = 3) -> str:
    """Numbers with ``digits`` significant decimals, NaN/None as an en dash, anything else as text."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "\u2013"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _cell(value: object, digits: int) -> str:
    if isinstance(value, Raw):
        return f"<td>{value}</td>"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"<td class='num'>{esc(fmt(value, digits))}</td>"
    return f"<td>{esc(fmt(value))}</td>"


def table(
    header: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    best: int | None = None,
    digits: int | Sequence[int] = 3,
    cls: str = "",
) -> Raw:
    """A table with a header row: numbers right-aligned with ``digits`` decimals (one value, or one per column),
    :class:`Raw` cells inserted as they are, row index ``best`` highlighted, ``cls`` as the table's class."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    per_column = [digits] * len(header) if isinstance(digits, int) else list(digits)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(_cell(v, per_column[j] if j < len(per_column) else 3) for j, v in enumerate(row))
        body.append(f"<tr{' class=best' if i == best else ''}>{cells}</tr>")
    attr = f" class='{esc(cls)}'" if cls else ""
    return Raw(f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def definitions(items: Iterable[tuple[str, str]]) -> Raw:
    """Term / definition pairs (placed beside the metrics they define)."""
    body = "".join(f"<dt>{esc(term)}</dt><dd>{esc(text)}</dd>" for term, text in items)
    return Raw(f"<dl class='defs'>{body}</dl>")


def paragraph(text: str, cls: str = "") -> Raw:
    """A paragraph of escaped text, optionally with a class (``verdict win``, ``note`` ...)."""
    return Raw(f"<p class='{esc(cls)}'>{esc(text)}</p>" if cls else f"<p>{esc(text)}</p>")


def section(anchor: str, title: str, *parts: str) -> Raw:
    """A ``<section id=anchor>`` with an ``<h2>`` title and its parts (plain strings are escaped paragraphs)."""
    body = "".join(p if isinstance(p, Raw) else str(paragraph(p)) for p in parts)
    return Raw(f"<section id='{esc(anchor)}'><h2>{esc(title)}</h2>{body}</section>")


def page(title: str, lead: str, sections: Sequence[tuple[str, str, Raw]]) -> str:
    """The whole document: title, a one-line lead, a table of contents, then ``(anchor, title, html)`` sections."""
    nav = "".join(f"<a href='#{esc(a)}'>{esc(t)}</a>" for a, t, _ in sections)
    body = "".join(section(a, t, h) for a, t, h in sections)
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{esc(title)}</h1><p class='lead'>{esc(lead)}</p><nav>{nav}</nav>{body}</body></html>"
    )
