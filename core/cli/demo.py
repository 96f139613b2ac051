"""``dinoscope demo [--out DIR] [--quick]``: the main job on embedded data, end to end, with an HTML report.

The steps are CLI invocations listed in ``core/cli/demo_steps.yaml`` (so core stays free of domain imports): SSL
pretraining on embedded synthetic data, export, kNN evaluation, then the canopy and cell-painting chains. Each
step's outputs stay in ``DIR``; ``DIR/index.html`` links every picture and metrics file. Re-running resumes:
finished steps (their ``done`` marker exists) are skipped.
"""

from __future__ import annotations

import html
import json
import logging
import time
from pathlib import Path

import yaml

from core.cli import main as cli_main
from core.cli.adapter import Invocation
from core.config.commands import DemoCfg
from core.errors import DinoscopeError
from core.io import atomic_path

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
DEMO_FILE = Path(__file__).with_name("demo_steps.yaml")


def _expand(argv: list, out: Path, quick: bool) -> list[str]:
    return [str(a).replace("{out}", str(out)).replace("{root}", str(ROOT)) for a in argv]


def run_demo(cfg: DemoCfg, options: None, invocation: Invocation) -> int:
    """Run every step of the demo (each a ``dinoscope`` command line), then write ``index.html``."""
    spec = yaml.safe_load(Path(cfg.steps or DEMO_FILE).read_text())
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for i, step in enumerate(spec["steps"], 1):
        marker = out / ".done" / f"{i:02d}"
        argv = list(step["argv"])
        if cfg.quick and step.get("quick"):
            # Overrides are positional: they go before the first option.
            cut = next((j for j, a in enumerate(argv) if str(a).startswith("--")), len(argv))
            argv = argv[:cut] + list(step["quick"]) + argv[cut:]
        argv = _expand(argv, out, cfg.quick)
        if marker.exists():
            log.info("[%d/%d] %s: done earlier, skipped", i, len(spec["steps"]), step["name"])
            summary.append({"step": step["name"], "status": "skipped (done earlier)", "argv": argv})
            continue
        log.info("[%d/%d] %s: dinoscope %s", i, len(spec["steps"]), step["name"], " ".join(argv))
        t0 = time.perf_counter()
        code = cli_main(argv)
        if code:
            raise DinoscopeError(
                f"demo step {i} ({step['name']}) failed with exit status {code}",
                fix="see the message above; re-running the demo resumes from this step",
            )
        marker.parent.mkdir(exist_ok=True)
        marker.touch()
        summary.append(
            {"step": step["name"], "status": "ok", "seconds": round(time.perf_counter() - t0, 1), "argv": argv}
        )
    report = write_index(out, summary)
    print(f"demo finished: open {report}")
    return 0


def write_index(out: Path, summary: list[dict]) -> Path:
    """One HTML page with every step, every PNG (inline) and every metrics JSON under ``out``."""
    rows = "".join(
        f"<tr><td>{html.escape(s['step'])}</td><td>{s['status']}</td><td>{s.get('seconds', '')}</td>"
        f"<td><code>dinoscope {html.escape(' '.join(s['argv']))}</code></td></tr>"
        for s in summary
    )
    figures = "".join(
        f"<figure><img src='{p.relative_to(out)}' style='max-width:480px'><figcaption>"
        f"{html.escape(str(p.relative_to(out)))}</figcaption></figure>"
        for p in sorted(out.rglob("*.png"))
    )
    metrics = ""
    for p in sorted(out.rglob("metrics.json")) + sorted(out.rglob("knn*.json")):
        try:
            text = json.dumps(json.loads(p.read_text()), indent=1)[:4000]
        except (OSError, json.JSONDecodeError):
            continue
        metrics += f"<h3>{html.escape(str(p.relative_to(out)))}</h3><pre>{html.escape(text)}</pre>"
    page = (
        f"<!doctype html><meta charset='utf-8'><title>dinoscope demo</title>"
        f"<style>body{{font-family:sans-serif;margin:2em}}figure{{display:inline-block;margin:.5em}}"
        f"td{{padding:.2em .6em;border-bottom:1px solid #ddd}}pre{{background:#f6f6f6;padding:.5em}}</style>"
        f"<h1>dinoscope demo</h1><table>{rows}</table><h2>Pictures</h2>{figures}<h2>Metrics</h2>{metrics}"
    )
    path = out / "index.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page)
    return path
