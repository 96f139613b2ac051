"""``RUN/run_info.json``: what produced a run (git commit, package versions, hardware), for reproducibility."""

from __future__ import annotations

import contextlib
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from core.io import write_json

_PACKAGES = ("dinoscope", "torch", "numpy", "deepspeed", "xformers", "rasterio", "zarr")


def git_commit() -> str | None:
    """The commit of the dinoscope checkout, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parents[2],
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_info(run_dir: Path, recipe_path: str | None, overrides: list[str], **extra: object) -> None:
    """Write ``run_dir/run_info.json`` atomically (call it on one rank only)."""
    versions = {}
    for package in _PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            versions[package] = version(package)
    write_json(
        Path(run_dir) / "run_info.json",
        {
            "recipe": recipe_path,
            "overrides": list(overrides),
            "git_commit": git_commit(),
            "argv": sys.argv,
            "versions": versions,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            **extra,
        },
    )
