"""``dinoscope curate`` end to end: embed an image folder (resumably), deduplicate, cluster, sample, and pretrain on
the curated manifest (``data.kind: manifest``); reports; manifests from plain ``.npy`` inputs; user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
import zarr
from PIL import Image

from core.cli import main
from core.curate import embed as embed_module
from core.data.datasets import SyntheticShapesDataset, build_dataset
from core.data.manifest import read_manifest, write_manifest
from core.errors import DinoscopeError
from core.models.vit import VisionTransformer
from core.weights import WeightMeta, save_backbone
from core.weights.meta import default_channel_names, default_normalisation

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny" / "pretrain.yaml"
N_IMAGES, N_COPIES = 18, 4


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An image folder of distinct 32 px images (two sub-folders) plus exact copies of the first few, and random
    ``vit_test``-sized weights."""
    root = tmp_path_factory.mktemp("curate") / "photos"
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        image = (rng.random((32, 32, 3)) * rng.random(3) * 255).astype(np.uint8)
        folder = root / ("fields" if i % 3 else "forest")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        if i < N_COPIES:
            Image.fromarray(image).save(root / "forest" / f"zz_copy_{i:03d}.png")
    kwargs = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0)
    torch.manual_seed(0)
    mean, std = default_normalisation(3)
    meta = WeightMeta("custom", kwargs, default_channel_names(3), mean, std, source_format="random_init")
    weights = save_backbone(VisionTransformer(**kwargs).eval(), meta, root.parent / "w.safetensors")
    return root, weights


def _stored(run: Path) -> np.ndarray:
    return zarr.open_group(run / "embeddings.zarr", mode="r")["embeddings"][:]


def _embed(images: tuple[Path, Path], out: Path, *extra: str) -> int:
    root, weights = images
    return main(["curate", "embed", str(root), "--weights", str(weights), "--out", str(out), "--chunk", "8", *extra])


def test_curated_manifest_feeds_pretrain(images: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    run = tmp_path / "pool"
    assert _embed(images, run) == 0
    ids = pq.read_table(run / "ids.parquet").to_pandas()
    assert list(ids.columns) == ["id", "source", "item", "path"] and len(ids) == N_IMAGES + N_COPIES
    assert zarr.open_group(run / "embeddings.zarr", mode="r")["embeddings"].shape == (N_IMAGES + N_COPIES, 64)
    assert main(["curate", "dedup", str(run), "--threshold", "0.9999", "--out", str(tmp_path / "dedup")]) == 0
    dedup = pq.read_table(tmp_path / "dedup" / "dedup.parquet").to_pandas()
    names = dedup.path.map(lambda p: Path(p).name)
    for i in range(N_COPIES):  # every copy is grouped with its original, and only one of the two is kept
        pair = dedup[names.isin([f"{i:03d}.png", f"zz_copy_{i:03d}.png"])]
        assert pair.group.nunique() == 1 and pair.keep.sum() == 1
    assert dedup.group.nunique() == N_IMAGES and dedup.keep.sum() == N_IMAGES
    report = (tmp_path / "dedup" / "report.html").read_text()
    assert "removed_duplicates" in report and "groups.png" in report and (tmp_path / "dedup" / "groups.png").stat()
    clusters = tmp_path / "clusters"
    subset = str(tmp_path / "dedup" / "dedup.parquet")
    assert main(["curate", "cluster", str(run), "--subset", subset, "--levels", "6,3", "--out", str(clusters)]) == 0
    assert {"report.html", "clusters.png", "cluster_sizes.png", "centroids.npz"} <= {p.name for p in clusters.iterdir()}
    manifest = tmp_path / "curated.parquet"
    assert main(["curate", "sample", str(run), "--clusters", str(clusters), "--size", "9", "--out", str(manifest)]) == 0
    sample = read_manifest(manifest)
    assert len(sample) == 9 and set(sample.ids) <= set(dedup.id[dedup.keep])
    assert sample.sources == [{"kind": "image_folder", "params": {"root": str(images[0])}}]
    assert (tmp_path / "curated_report" / "sample.png").exists()
    recipe = yaml.safe_load(TINY.read_text())
    recipe["data"] = {"kind": "manifest", "params": {"manifest": str(manifest)}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    fast = ["train.max_iters=2", "train.log_every=1", "train.batch_size_per_rank=4", "optim.warmup_epochs=0.01"]
    fast += ["optim.freeze_last_layer_epochs=0.01", "teacher.warmup_teacher_temp_epochs=0.01"]
    capsys.readouterr()
    assert main(["pretrain", str(tmp_path / "recipe.yaml"), *fast, "--output-dir", str(tmp_path / "pretrain")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2] and all(np.isfinite(r["loss/total"]) for r in rows)
    dataset = build_dataset("manifest", manifest=str(manifest))
    first = Path(sample.columns["path"][0])
    assert np.array_equal(dataset[0], np.asarray(Image.open(first)))


def test_embedding_resumes_after_a_crash_and_refuses_other_settings(
    images: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    assert _embed(images, tmp_path / "reference") == 0
    append = embed_module.PartWriter.append
    calls: list[int] = []

    def crash_after_one(self, chunk, rows, seconds) -> None:
        calls.append(chunk)
        if len(calls) == 2:
            raise KeyboardInterrupt
        append(self, chunk, rows, seconds)

    monkeypatch.setattr(embed_module.PartWriter, "append", crash_after_one)
    run = tmp_path / "run"
    assert _embed(images, run) == 130 and not (run / "ids.parquet").exists()
    calls.clear()
    monkeypatch.setattr(embed_module.PartWriter, "append", lambda *a: calls.append(a[1]) or append(*a))
    assert _embed(images, run) == 0
    assert calls == [1, 2]  # chunk 0 was committed before the crash and is not embedded again
    np.testing.assert_allclose(_stored(run), _stored(tmp_path / "reference"), atol=1e-5)
    assert not (run / "parts").exists()
    calls.clear()
    assert _embed(images, run) == 0 and calls == []  # complete: nothing to do
    capsys.readouterr()
    assert _embed(images, run, "--size", "16") == 2
    assert "different settings (size)" in capsys.readouterr().err
    assert _embed(images, run, "--size", "16", "--overwrite") == 0
    assert zarr.open_group(run / "embeddings.zarr", mode="r").attrs["size"] == 16


def test_npy_inputs_against_retrieve_and_manifests_without_sources(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(300, 16)).astype(np.float32)
    pool[250:260] = pool[:10] * 1.5  # same direction: cosine 1
    np.save(tmp_path / "pool.npy", pool)
    np.save(tmp_path / "eval.npy", pool[20:25] + 1e-4)
    np.save(tmp_path / "seed.npy", pool[[30, 40]])
    dedup = tmp_path / "dedup"
    argv = ["curate", "dedup", str(tmp_path / "pool.npy"), "--against", str(tmp_path / "eval.npy"), "--device", "cpu"]
    assert main([*argv, "--threshold", "0.999", "--out", str(dedup)]) == 0
    table = read_manifest(dedup / "dedup.parquet")
    assert table.sources is None and table.columns["leak"][20:25].all() and table.columns["leak"].sum() == 5
    assert not table.columns["keep"][250:260].any() and table.columns["keep"].sum() == 300 - 10 - 5
    summary = json.loads((dedup / "dedup_summary.json").read_text())
    assert summary["removed_duplicates"] == 10 and summary["removed_near_eval"] == 5
    out = tmp_path / "retrieved.parquet"
    argv = ["curate", "retrieve", str(tmp_path / "pool.npy"), "--queries", str(tmp_path / "seed.npy"), "--k", "3"]
    assert main([*argv, "--subset", str(dedup / "dedup.parquet"), "--out", str(out)]) == 0
    retrieved = pq.read_table(out).to_pandas()
    assert len(retrieved) == 6 and {30, 40} <= set(retrieved.id) and (retrieved[retrieved.id == 30]["rank"] == 0).all()
    assert not set(retrieved.id) & set(range(20, 25))  # removed by the subset
    assert (tmp_path / "retrieved_report" / "report.html").exists()
    with pytest.raises(DinoscopeError, match="sources"):
        build_dataset("manifest", manifest=str(out))
    shapes = [{"kind": "synthetic_shapes", "params": {"n": 300, "size": 16}}]
    dataset = build_dataset("manifest", manifest=str(out), sources=shapes)
    expected = SyntheticShapesDataset(n=300, size=16)[int(retrieved.id[0])]
    assert len(dataset) == 6 and np.array_equal(dataset[0], expected)


def test_manifest_rows_read_paths_windows_and_keep(tmp_path: Path) -> None:
    image = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    Image.fromarray(image).save(tmp_path / "a.png")
    path = str(tmp_path / "a.png")
    windows = ["5,2,10,8", None, "0,0,4,4"]
    columns = {"id": [0, 1, 2], "path": [path] * 3, "window": windows, "keep": [True, True, False]}
    manifest = write_manifest(tmp_path / "m.parquet", columns)
    dataset = build_dataset("manifest", manifest=str(manifest))
    assert len(dataset) == 2 and dataset.channel_names == ["red", "green", "blue"]
    assert np.array_equal(dataset[0], image[2:10, 5:15]) and np.array_equal(dataset[1], image)


def test_user_errors_name_the_input_and_the_fix(tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "x.npy", np.ones((10, 4), np.float32))
    assert main(["curate", "dedup", str(tmp_path / "missing.npy")]) == 2
    assert "curate embed` run directory" in capsys.readouterr().err
    assert main(["curate", "cluster", str(tmp_path / "x.npy"), "--levels", "2,5", "--out", str(tmp_path / "c")]) == 2
    assert "must shrink" in capsys.readouterr().err
    assert main(["curate", "cluster", str(tmp_path / "x.npy"), "--levels", "3,2", "--out", str(tmp_path / "c")]) == 0
    argv = ["curate", "sample", str(tmp_path / "x.npy"), "--clusters", str(tmp_path / "c")]
    assert main([*argv, "--out", str(tmp_path / "m.parquet")]) == 2
    assert "--size" in capsys.readouterr().err
    assert main([*argv, "--size", "11", "--out", str(tmp_path / "m.parquet")]) == 2
    assert "at most 10" in capsys.readouterr().err
    assert main([*argv, "--size", "5", "--out", str(tmp_path / "m.csv")]) == 2
    assert "end --out with .parquet" in capsys.readouterr().err
    assert not list(tmp_path.glob(".m.*.lock"))  # refused before anything was locked or written
    if not torch.cuda.is_available():
        assert main(["curate", "dedup", str(tmp_path / "x.npy"), "--device", "cuda", "--out", str(tmp_path / "d")]) == 2
        assert "no usable CUDA" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_embed_one_store(images: tuple[Path, Path], tmp_path: Path) -> None:
    root, weights = images
    assert _embed(images, tmp_path / "reference") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DINOSCOPE_NO_PROGRESS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "core.cli"]
    command += ["curate", "embed", str(root), "--weights", str(weights), "--out", str(tmp_path / "run"), "--chunk", "5"]
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    np.testing.assert_allclose(_stored(tmp_path / "run"), _stored(tmp_path / "reference"), atol=1e-5)
    assert pq.read_table(tmp_path / "run" / "ids.parquet").column("id").to_pylist() == list(range(N_IMAGES + N_COPIES))
