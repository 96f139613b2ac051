"""Core datasets (image folder, synthetic shapes), dataset kinds and entry points, channel statistics, and the
resumable sharded InfiniteSampler."""

from __future__ import annotations

import itertools
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import core.data.datasets as datasets_module
from core.data import (
    DATASET_KINDS,
    ImageFolderDataset,
    InfiniteSampler,
    SyntheticShapesDataset,
    build_dataset,
    compute_channel_stats,
)
from core.errors import DinoscopeError

REAL = Path(__file__).parents[1] / "data" / "real"


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)


def test_image_folder_reads_png_jpeg_and_tiff_layouts(tmp_path: Path) -> None:
    rgb = _rgb(0)
    smooth = np.repeat(np.linspace(0, 250, 10, dtype=np.uint8)[None, :, None], 12, axis=0).repeat(3, axis=2)
    _write_png(tmp_path / "a" / "one.png", rgb)
    Image.fromarray(smooth).save(tmp_path / "a" / "two.JPG", quality=95)
    stack = np.random.default_rng(1).integers(0, 65535, (3, 12, 10), dtype=np.uint16)
    (tmp_path / "b" / "deep").mkdir(parents=True)
    tifffile.imwrite(tmp_path / "b" / "deep" / "planar.tif", stack, imagej=True)
    tifffile.imwrite(tmp_path / "b" / "contig.tiff", np.moveaxis(stack, 0, -1), photometric="rgb")
    dataset = ImageFolderDataset(tmp_path)
    assert len(dataset) == 4 and dataset.num_channels == 3 and dataset.channel_names == ["red", "green", "blue"]
    by_name = {Path(f).name: dataset[i] for i, f in enumerate(dataset.files)}
    assert np.array_equal(by_name["one.png"], rgb)
    assert by_name["two.JPG"].shape == (12, 10, 3) and by_name["two.JPG"].dtype == np.uint8
    assert np.abs(by_name["two.JPG"].astype(int) - smooth).max() <= 8  # lossy, but the same picture
    assert np.array_equal(by_name["planar.tif"], np.moveaxis(stack, 0, -1))
    assert np.array_equal(by_name["contig.tiff"], np.moveaxis(stack, 0, -1))


def test_image_folder_reads_real_geotiff_and_microscopy_files(tmp_path: Path) -> None:
    for name in ("OSBS_029.tif", "rmnp-rgb.tif"):
        (tmp_path / "rgb" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "rgb" / name).write_bytes((REAL / name).read_bytes())
    orthophotos = ImageFolderDataset(tmp_path / "rgb")
    assert [orthophotos[i].shape for i in range(2)] == [(400, 400, 3), (373, 485, 3)]
    assert orthophotos[0].dtype == np.uint8 and orthophotos.channel_names == ["red", "green", "blue"]
    (tmp_path / "cells").mkdir()
    (tmp_path / "cells" / "nuclei.tif").write_bytes((REAL / "nuclei_dsb2018_img.tif").read_bytes())
    nuclei = ImageFolderDataset(tmp_path / "cells", channel_names=["dna"])[0]
    assert nuclei.shape == (512, 512, 1) and nuclei.dtype == np.uint16 and 0 < nuclei.max() <= 235


def test_image_folder_handles_many_channels_gray_16bit_and_float(tmp_path: Path) -> None:
    sixteen = np.random.default_rng(2).random((16, 8, 9)).astype(np.float32)
    tifffile.imwrite(tmp_path / "s.tif", sixteen)
    dataset = ImageFolderDataset(tmp_path, channel_names=[f"band{i}" for i in range(16)])
    assert dataset[0].shape == (8, 9, 16) and dataset[0].dtype == np.float32
    assert np.array_equal(dataset[0], np.moveaxis(sixteen, 0, -1)) and dataset.channel_names[15] == "band15"
    gray = tmp_path / "gray"
    deep = np.arange(90, dtype=np.uint16).reshape(9, 10) * 700
    _write_png(gray / "deep.png", deep)
    tifffile.imwrite(gray / "f64.tif", np.full((9, 10), 0.25))
    gray_set = ImageFolderDataset(gray)
    assert gray_set.channel_names == ["ch0"]
    assert np.array_equal(gray_set[0][..., 0], deep) and gray_set[0].dtype == np.uint16
    assert gray_set[1].dtype == np.float32 and gray_set[1].shape == (9, 10, 1)


def test_image_folder_labelled_mode_uses_first_subfolder(tmp_path: Path) -> None:
    for name, seed in [("cat/x.png", 0), ("cat/nested/y.png", 1), ("dog/z.png", 2)]:
        _write_png(tmp_path / name, _rgb(seed))
    dataset = ImageFolderDataset(tmp_path, labelled=True)
    assert dataset.classes == ["cat", "dog"]
    labels = {Path(f).name: dataset[i][1] for i, f in enumerate(dataset.files)}
    assert labels == {"x.png": 0, "y.png": 0, "z.png": 1}
    image, label = dataset[2]
    assert image.shape == (12, 10, 3) and isinstance(label, int)


def test_image_folder_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DinoscopeError, match="no image files") as info:
        ImageFolderDataset(tmp_path)
    assert info.value.path == str(tmp_path) and info.value.fix
    with pytest.raises(DinoscopeError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DinoscopeError, match="cannot be read") as info:
        ImageFolderDataset(tmp_path)
    assert info.value.path.endswith("broken.png")
    (tmp_path / "broken.png").unlink()
    _write_png(tmp_path / "rgb.png", _rgb(0))
    _write_png(tmp_path / "gray.png", _rgb(1)[..., 0])
    with pytest.raises(DinoscopeError, match="different channel counts") as info:
        ImageFolderDataset(tmp_path)
    assert "1 channels: gray.png" in str(info.value) and "3 channels: rgb.png" in str(info.value)
    (tmp_path / "gray.png").unlink()
    with pytest.raises(DinoscopeError, match="class sub-folder"):
        ImageFolderDataset(tmp_path, labelled=True)
    with pytest.raises(DinoscopeError) as info:
        ImageFolderDataset(tmp_path, channel_names=["r", "g"])
    assert info.value.field == "channel_names"
    (tmp_path / "sub").mkdir()
    tifffile.imwrite(tmp_path / "sub" / "volume.tif", np.zeros((2, 3, 8, 8), np.uint8), photometric="minisblack")
    with pytest.raises(DinoscopeError, match="axes") as info:
        ImageFolderDataset(tmp_path / "sub")
    assert info.value.path.endswith("volume.tif")


def test_synthetic_shapes_are_deterministic_balanced_and_textured() -> None:
    dataset = SyntheticShapesDataset(n=40, size=32, channels=5, seed=3, labelled=True)
    image, label = dataset[6]
    assert image.shape == (32, 32, 5) and image.dtype == np.uint8 and label == 2
    assert np.array_equal(image, SyntheticShapesDataset(n=40, size=32, channels=5, seed=3)[6])
    assert not np.array_equal(image, dataset[10][0])
    assert not np.array_equal(image, SyntheticShapesDataset(n=40, size=32, channels=5, seed=4)[6])
    assert dataset.classes == list(SyntheticShapesDataset.CLASS_NAMES) and len(dataset.channel_names) == 5
    assert np.bincount([dataset[i][1] for i in range(len(dataset))]).tolist() == [10] * 4
    # Horizontal stripes (class 0) vary along y, vertical stripes (class 1) along x: the texture carries the class.
    for index, axis in [(0, 0), (1, 1)]:
        for n in range(index, 40, 4):
            plane = dataset[n][0][..., 0].astype(float)
            along, across = np.abs(np.diff(plane, axis=axis)).sum(), np.abs(np.diff(plane, axis=1 - axis)).sum()
            assert along > 1.15 * across  # noise alone gives about 1.0
    with pytest.raises(DinoscopeError, match="num_classes"):
        SyntheticShapesDataset(num_classes=7)


def test_build_dataset_core_kinds_and_errors() -> None:
    assert set(DATASET_KINDS) == {"image_folder", "manifest", "synthetic_scenes", "synthetic_shapes"}
    dataset = build_dataset("synthetic_shapes", n=4, size=16, channels=2)
    assert isinstance(dataset, SyntheticShapesDataset) and dataset[0].shape == (16, 16, 2)
    with pytest.raises(DinoscopeError, match="unknown dataset kind") as info:
        build_dataset("imagenet")
    assert "image_folder" in info.value.fix and "synthetic_shapes" in info.value.fix
    with pytest.raises(DinoscopeError, match="invalid arguments") as info:
        build_dataset("synthetic_shapes", bands=3)
    assert "channels" in info.value.fix


def test_build_dataset_finds_entry_point_kinds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    group = "dinoscope.datasets"
    plugins = [
        EntryPoint("plugin_shapes", "core.data.datasets:SyntheticShapesDataset", group),
        EntryPoint("broken", "dinoscope_missing_plugin.data:Tiles", group),
        EntryPoint("image_folder", "dinoscope_missing_plugin.data:Shadowed", group),
    ]
    monkeypatch.setattr(datasets_module, "entry_points", lambda group: [ep for ep in plugins if ep.group == group])
    dataset = build_dataset("plugin_shapes", n=3, size=16, channels=1)
    assert len(dataset) == 3 and dataset.channel_names == ["ch0"]
    with pytest.raises(DinoscopeError, match="could not be imported"):
        build_dataset("broken")
    _write_png(tmp_path / "x.png", _rgb(0))
    assert isinstance(build_dataset("image_folder", root=tmp_path), ImageFolderDataset)  # core kind not shadowed
    with pytest.raises(DinoscopeError) as info:
        build_dataset("nope")
    assert "plugin_shapes" in info.value.fix and "broken" in info.value.fix


def test_compute_channel_stats_matches_numpy_and_ignores_nan() -> None:
    images = [np.random.default_rng(i).integers(0, 65535, (6, 7, 3), dtype=np.uint16) for i in range(5)]
    mean, std = compute_channel_stats(images, n_samples=100, seed=0)
    pixels = np.concatenate([im.reshape(-1, 3) for im in images]) / 65535.0
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, pixels.std(0), rtol=1e-5)
    mean12, _ = compute_channel_stats(images, n_samples=5, max_value=4095.0)
    np.testing.assert_allclose(mean12, pixels.mean(0) * 65535 / 4095, rtol=1e-6)
    with_nan = np.ones((4, 4, 2), dtype=np.float32)
    with_nan[0, 0, 1] = np.nan
    mean, std = compute_channel_stats([(with_nan, 0)], n_samples=1)
    assert mean == [1.0, 1.0] and std == [0.0, 0.0]
    subset_mean, _ = compute_channel_stats(images, n_samples=2, seed=1)
    assert not np.allclose(subset_mean, pixels.mean(0))


def _take(sampler: InfiniteSampler, n: int) -> list[int]:
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("size,world_size", [(7, 3), (10, 2), (5, 8), (12, 1)])
def test_sampler_shards_are_the_global_stream_interleaved(size: int, world_size: int) -> None:
    stream = _take(InfiniteSampler(size, seed=4), 60 * world_size)
    for epoch in range(4):
        assert sorted(stream[epoch * size : (epoch + 1) * size]) == list(range(size))
    assert stream[:size] != stream[size : 2 * size]
    shards = [_take(InfiniteSampler(size, seed=4, rank=r, world_size=world_size), 60) for r in range(world_size)]
    for rank, shard in enumerate(shards):
        assert shard == stream[rank::world_size]
    # Within one pass over the data the ranks see disjoint indices.
    per_pass = size // world_size
    if per_pass:
        first_pass = [set(shard[:per_pass]) for shard in shards]
        assert sum(len(s) for s in first_pass) == len(set().union(*first_pass)) == per_pass * world_size


@pytest.mark.parametrize("world_size", [1, 3])
def test_sampler_resumes_exactly(world_size: int) -> None:
    batch, iterations = 4, 5
    for rank in range(world_size):
        full = _take(InfiniteSampler(11, seed=9, rank=rank, world_size=world_size), 80)
        resumed = InfiniteSampler(11, seed=9, rank=rank, world_size=world_size, start_index=iterations * batch)
        assert _take(resumed, 80 - iterations * batch) == full[iterations * batch :]


def test_sampler_seed_shuffle_and_validation() -> None:
    assert _take(InfiniteSampler(5, shuffle=False, rank=1, world_size=2), 6) == [1, 3, 0, 2, 4, 1]
    assert _take(InfiniteSampler(50, seed=1), 50) != _take(InfiniteSampler(50, seed=2), 50)
    assert _take(InfiniteSampler(50, seed=1), 50) == _take(InfiniteSampler(50, seed=1), 50)
    with pytest.raises(DinoscopeError, match="empty dataset"):
        InfiniteSampler(0)
    with pytest.raises(DinoscopeError, match="rank 2"):
        InfiniteSampler(10, rank=2, world_size=2)
