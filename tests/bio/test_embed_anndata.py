"""`dinoscope cells embed --format anndata`: the cells as an AnnData store that anndata (and so scanpy, whose
``read_h5ad`` is anndata's) opens, with obs = the per-cell table and X = the embeddings (fixtures ``screen`` and
``weights`` come from ``conftest.py``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr

import bio.embed_anndata as anndata_mod
from core.cli import main


def _args(screen: object, weights: Path, out: Path, *extra: str) -> list[str]:
    table = ["--centroids", "table", "--nuclei-table", str(screen.nuclei), "--crop-size", "32"]
    return ["cells", "embed", str(screen.plates[0]), "--weights", str(weights), "--out", str(out), *table, *extra]


def test_format_anndata_writes_a_store_anndata_reads_back(screen: object, weights: Path, tmp_path: Path) -> None:
    anndata = pytest.importorskip("anndata")
    run = tmp_path / "run"
    assert main(_args(screen, weights, run, "--format", "anndata")) == 0
    adata = anndata.read_h5ad(run / "cells.h5ad")
    emb = np.asarray(zarr.open_group(run / "embeddings.zarr", mode="r")["embeddings"][:])
    cells = pd.read_parquet(run / "cells.parquet")
    assert adata.shape == emb.shape and adata.var_names[0] == "emb_0"
    np.testing.assert_array_equal(np.asarray(adata.X), emb)
    assert list(adata.obs.columns) == list(cells.columns)
    for column in cells.columns:
        np.testing.assert_array_equal(
            adata.obs[column].astype(cells[column].dtype).to_numpy(), cells[column].to_numpy()
        )
    assert json.loads(adata.uns["dinoscope"])["channel_names"] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    backed = anndata.read_h5ad(run / "cells.h5ad", backed="r")  # scanpy's large-file mode reads rows lazily
    np.testing.assert_array_equal(backed.X[3], emb[3])
    backed.file.close()


def test_a_finished_run_gains_its_anndata_store_without_embedding_again(
    screen: object, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("anndata")
    run = tmp_path / "run"
    assert main(_args(screen, weights, run)) == 0 and not (run / "cells.h5ad").exists()
    log = (run / "embed_log.jsonl").read_text()
    assert main(_args(screen, weights, run, "--format", "anndata")) == 0
    assert "writing the AnnData store of the finished run" in capsys.readouterr().err
    assert (run / "cells.h5ad").exists() and (run / "embed_log.jsonl").read_text() == log


def test_format_anndata_without_the_package_fails_before_any_work(
    screen: object, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        anndata_mod.importlib.util, "find_spec", lambda name, *a: None if name == "anndata" else real(name, *a)
    )
    out = tmp_path / "out"
    assert main(_args(screen, weights, out, "--format", "anndata")) == 2
    err = capsys.readouterr().err
    assert "--format anndata needs the anndata package" in err and "pip install anndata" in err
    assert not out.exists()
