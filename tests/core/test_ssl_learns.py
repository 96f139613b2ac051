"""Slow: a few hundred CPU steps of the tiny recipe beat the same architecture at random init in kNN accuracy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "ssl_knn.py"


@pytest.mark.slow
def test_pretraining_beats_random_init_in_knn(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("ssl_knn", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.run(200, tmp_path / "run")
    assert result["knn_top1_pretrained"][20] > result["knn_top1_random_init"][20] + 5
