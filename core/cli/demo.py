"""``dinoscope demo [--out DIR] [--quick]``: the main job on embedded data, end to end, with a one-page report.

The steps are listed in ``core/cli/demo_steps.yaml`` (so core stays free of domain imports). Most are ``dinoscope``
command lines (``argv``); a few are calls of :data:`core.report.baselines.DEMO_CALLS` that write the baselines
(``call`` + ``args``). The story: pretrain a tiny ViT on cluttered synthetic scenes, export it, compare it with its
random-init twin and with raw pixels (kNN), fit canopy-height heads on it and on two baselines, and run the
cell-painting chain (synthetic screen, channel-adaptive pretraining, embeddings, profiles, mAP) for the pretrained
cell backbone and the same two kinds of baseline.

Each finished step leaves ``DIR/.done/NN.json`` (its command, seconds, finish time); re-running resumes after the
last finished step and keeps the first run's timings. ``DIR/index.html`` (:func:`core.report.write_demo_report`) is
written at the end, and also when a step fails, with what exists so far.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

from core.cli import main as cli_main
from core.cli.adapter import Invocation
from core.config.commands import DemoCfg
from core.errors import DinoscopeError
from core.io import write_json
from core.report import write_demo_report
from core.report.baselines import DEMO_CALLS

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
DEMO_FILE = Path(__file__).with_name("demo_steps.yaml")


def _expand(value: Any, out: Path) -> Any:
    """``{out}`` and ``{root}`` substituted in every string of a (nested) argument."""
    if isinstance(value, str):
        return value.replace("{out}", str(out)).replace("{root}", str(ROOT))
    if isinstance(value, list):
        return [_expand(v, out) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, out) for k, v in value.items()}
    return value


def _command(step: dict, out: Path, quick: bool) -> tuple[list[str] | None, dict | None]:
    """``(argv, None)`` for a command-line step, ``(None, call arguments)`` for a call step."""
    if "call" in step:
        args = {**step.get("args", {}), **(step.get("quick", {}) if quick else {})}
        return None, _expand(args, out)
    argv = [str(a) for a in step["argv"]]
    if quick and "quick_argv" in step:
        return _expand([str(a) for a in step["quick_argv"]], out), None
    if quick and step.get("quick"):
        # Overrides are positional: they go before the first option.
        cut = next((j for j, a in enumerate(argv) if a.startswith("--")), len(argv))
        argv = argv[:cut] + [str(a) for a in step["quick"]] + argv[cut:]
    return _expand(argv, out), None


def _describe_call(name: str, args: dict) -> str:
    """``name key=value ...`` (nested values compact) for the log and the report's timings table."""
    parts = [
        f"{k}={json.dumps(v, separators=(',', ':')) if isinstance(v, (dict, list)) else v}" for k, v in args.items()
    ]
    return f"{name} {' '.join(parts)}"


def _run_step(step: dict, argv: list[str] | None, args: dict | None) -> None:
    if argv is None:
        if step["call"] not in DEMO_CALLS:
            raise DinoscopeError(f"unknown demo call {step['call']!r}", fix=f"use one of {sorted(DEMO_CALLS)}")
        DEMO_CALLS[step["call"]](**(args or {}))
        return
    code = cli_main(argv)
    if code:
        raise DinoscopeError(f"exit status {code}")


def _read_marker(marker: Path) -> dict:
    try:
        return json.loads(marker.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def _run_steps(steps: list[dict], out: Path, quick: bool) -> list[dict[str, Any]]:
    """Run the unfinished steps in order; the records of all steps (earlier runs' from their markers)."""
    records: list[dict[str, Any]] = []
    for i, step in enumerate(steps, 1):
        marker = out / ".done" / f"{i:02d}.json"
        argv, args = _command(step, out, quick)
        shown = f"dinoscope {' '.join(argv)}" if argv is not None else _describe_call(step["call"], args or {})
        record: dict[str, Any] = {"step": step["name"], "command": shown, "quick": quick}
        if marker.exists():
            earlier = _read_marker(marker)
            log.info("[%d/%d] %s: done in an earlier run, skipped", i, len(steps), step["name"])
            records.append({**record, **earlier, "status": "done in an earlier run"})
            continue
        log.info("[%d/%d] %s: %s", i, len(steps), step["name"], shown)
        t0 = time.perf_counter()
        try:
            _run_step(step, argv, args)
        except Exception as err:
            records.append({**record, "status": "failed", "seconds": round(time.perf_counter() - t0, 1)})
            write_demo_report(out, records, quick=quick)
            message = err.message if isinstance(err, DinoscopeError) else f"{type(err).__name__}: {err}"
            raise DinoscopeError(
                f"demo step {i} ({step['name']}) failed: {message}",
                fix="see the messages above; re-running the demo resumes from this step",
            ) from err
        record.update(
            status="ran",
            seconds=round(time.perf_counter() - t0, 1),
            finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        write_json(marker, record)
        records.append(record)
    return records


def run_demo(cfg: DemoCfg, options: None, invocation: Invocation) -> int:
    """Run every step of the demo that has not finished yet, then write ``index.html``."""
    spec = yaml.safe_load(Path(cfg.steps or DEMO_FILE).read_text())
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = spec["steps"]
    mixed = [
        m.name for m in sorted((out / ".done").glob("*.json")) if _read_marker(m).get("quick", cfg.quick) != cfg.quick
    ]
    if mixed:
        raise DinoscopeError(
            f"the directory holds a demo run made {'without' if cfg.quick else 'with'} --quick ({len(mixed)} "
            "finished steps): its numbers would be mixed with this run's",
            path=out,
            fix="give another --out, or delete the directory to start over",
        )
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        report = write_demo_report(out, _run_steps(steps, out, cfg.quick), quick=cfg.quick)
    finally:
        torch.set_num_threads(threads)  # the demo can run inside a larger process (the tests)
    print(f"demo finished: open {report}")
    return 0
