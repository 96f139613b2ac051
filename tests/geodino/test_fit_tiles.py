"""`canopy fit` on collections as they come: globs of image tiles with one CHM (a file, or a glob of CHM tiles that
becomes a VRT mosaic) covering them; an image no CHM covers is refused before anything is written."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.windows import Window

from core.cli import main
from geodino.synthetic import make_forest

TINY_FIT = Path(__file__).parents[2] / "recipes" / "tiny" / "canopy_fit.yaml"
QUICK = ["data.synthetic.scenes=0", "optim.epochs=1", "data.chip_size=32", "data.block_size=32", "train.progress=false"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def quarters(image: Path, out: Path, shift: float = 0.0) -> list[Path]:
    """The four quarters of ``image`` as touching GeoTIFFs (moved ``shift`` metres east)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with rasterio.open(image) as src:
        half = src.width // 2
        for i in range(2):
            for j in range(2):
                window = Window(j * half, i * half, half, half)
                transform = src.window_transform(window)
                profile = dict(src.profile, width=half, height=half, transform=Affine.translation(shift, 0) * transform)
                paths.append(out / f"{image.stem}_{i}{j}.tif")
                with rasterio.open(paths[-1], "w", **profile) as dst:
                    dst.write(src.read(window=window))
    return paths


def fit(run: Path, *overrides: str) -> int:
    return main(["canopy", "fit", str(TINY_FIT), *QUICK, *overrides, "--output-dir", str(run)])


def test_fit_takes_image_globs_with_one_chm_or_a_glob_of_chm_tiles(tmp_path: Path) -> None:
    rgb, chm = make_forest(tmp_path / "forest", size=192, seed=40)
    quarters(rgb, tmp_path / "images")
    chm_tiles = quarters(chm, tmp_path / "chm_tiles")
    images = f"data.images=[{tmp_path}/images/*.tif]"

    assert fit(tmp_path / "one_chm", images, f"data.chm={chm}") == 0
    trained = json.loads((tmp_path / "one_chm" / "model.json").read_text())["metadata"]["trained_on"]
    assert [Path(a).name for a, _ in trained] == [f"forest_seed40_rgb_{i}{j}.tif" for i in (0, 1) for j in (0, 1)]
    assert {Path(b) for _, b in trained} == {chm}

    assert fit(tmp_path / "chm_tiles_run", images, f"data.chm={tmp_path}/chm_tiles/*.tif") == 0
    trained = json.loads((tmp_path / "chm_tiles_run" / "model.json").read_text())["metadata"]["trained_on"]
    [vrt] = {Path(b) for _, b in trained}
    assert vrt.parent == tmp_path / "chm_tiles_run" / "chm" and vrt.suffix == ".vrt"
    with rasterio.open(vrt) as mosaic, rasterio.open(chm) as whole:  # the CHM tiles mosaic back into the CHM
        assert mosaic.transform == whole.transform
        np.testing.assert_array_equal(mosaic.read(1), whole.read(1))
    assert len(chm_tiles) == 4


def test_an_image_no_chm_covers_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rgb, chm = make_forest(tmp_path / "forest", size=128, seed=41)
    far = quarters(rgb, tmp_path / "far", shift=5000.0)[0]
    run = tmp_path / "run"
    assert fit(run, f"data.images=[{far}]", f"data.chm={chm}") == 2
    err = capsys.readouterr().err
    assert far.name in err and "no CHM covers this image" in err and "fix:" in err and not run.exists()
    assert fit(run, f"data.images=[{tmp_path}/none/*.tif]", f"data.chm={chm}") == 2
    assert "no raster files found" in capsys.readouterr().err and not run.exists()
    assert fit(run, f"data.images=[{rgb}]") == 2
    assert "data.images and data.chm go together" in capsys.readouterr().err
