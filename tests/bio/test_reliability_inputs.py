"""`dinoscope cells embed` keeps its promises about inputs: every input is checked before anything is embedded or
written, a run that embeds no cell fails saying why, and a truncated multi-page OME-TIFF is an error, never a
one-channel image (fixtures ``screen`` and ``weights`` come from ``conftest.py``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from bio import io
from bio.synthetic import CHANNELS, make_plate
from core.cli import main
from core.errors import DinoscopeError


def _embed_cli(sources: list[Path], weights: Path, out: Path, *extra: str) -> list[str]:
    return ["cells", "embed", *map(str, sources), "--weights", str(weights), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def two_plates(tmp_path_factory: pytest.TempPathFactory) -> object:
    return make_plate(tmp_path_factory.mktemp("two"), n_rows=3, n_cols=3, fields=1, size=64, plates=2)


def _fails_before_writing(argv: list[str], out: Path, capsys: pytest.CaptureFixture) -> str:
    """Run the CLI; it must exit 2 and leave no output directory behind. Returns the message."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "unexpected" not in err
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    return err


def test_a_nuclei_table_naming_other_plates_fails_before_any_work(
    two_plates: object, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    nuclei = pd.read_csv(two_plates.nuclei)
    renamed = tmp_path / "renamed.csv"
    nuclei.assign(plate="BR0001").to_csv(renamed, index=False)
    out = tmp_path / "out"
    argv = _embed_cli(two_plates.plates, weights, out, "--centroids", "table", "--nuclei-table", str(renamed))
    err = _fails_before_writing(argv, out, capsys)
    assert "the nuclei table names plates 'BR0001'; the sources are 'plate1', 'plate2'" in err
    assert "renamed.csv" in err and "fix:" in err
    # per source: plate2 has no row at all, although plate1 matches
    only_first = tmp_path / "only_plate1.csv"
    nuclei[nuclei["plate"] == "plate1"].to_csv(only_first, index=False)
    argv = _embed_cli(two_plates.plates, weights, out, "--centroids", "table", "--nuclei-table", str(only_first))
    err = _fails_before_writing(argv, out, capsys)
    assert "no rows for any of the 9 fields of" in err and "plate2.ome.zarr" in err and "'plate2'" in err


def test_missing_or_unreadable_ngff_fields_fail_before_any_work(
    screen: object, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    plate = tmp_path / "plate1.ome.zarr"
    shutil.copytree(screen.plates[0], plate)
    shutil.rmtree(plate / "C" / "3" / "1")  # listed by the well's metadata, gone on disk
    (plate / "B" / "2" / "0" / "0" / "zarr.json").write_text("{not json")  # the pixel array's metadata is corrupt
    out = tmp_path / "out"
    args = ("--centroids", "table", "--nuclei-table", str(screen.nuclei))
    err = _fails_before_writing(_embed_cli([plate], weights, out, *args), out, capsys)
    assert "field plate1/B02/0" in err and "1 more of its 18 fields fail too" in err
    shutil.rmtree(plate / "B" / "2" / "0")
    err = _fails_before_writing(_embed_cli([plate], weights, out, *args), out, capsys)
    assert "field plate1/B02/0: image not found" in err and str(plate / "B" / "2" / "0") in err


def test_missing_manifest_images_and_channels_fail_before_any_work(
    screen: object, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rows = []
    for well, site in (("A01", "0"), ("B02", "1"), ("C03", "0")):
        with io.read_image(screen.plates[0] / well[0] / str(int(well[1:])) / site) as image:
            data = image.read()
        files = {}
        for name, plane in zip(CHANNELS, data, strict=True):
            tifffile.imwrite(tmp_path / f"{well}_{site}_{name}.tif", plane)
            files[f"FileName_{name}"] = f"{well}_{site}_{name}.tif"
        rows.append({"Metadata_Plate": "plate1", "Metadata_Well": well, "Metadata_Site": site, **files})
    manifest = tmp_path / "load_data.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    (tmp_path / "C03_0_Mito.tif").unlink()  # the last row's last file: found before any field is embedded
    (tmp_path / "C03_0_ER.tif").unlink()
    out = tmp_path / "out"
    table = ("--centroids", "table", "--nuclei-table", str(screen.nuclei))
    err = _fails_before_writing(_embed_cli([manifest], weights, out, *table), out, capsys)
    assert "line 4: image file" in err and "C03_0_ER.tif does not exist (1 more listed files" in err
    assert "[FileName_ER]" in err
    (tmp_path / "C03_0_Mito.tif").write_bytes((tmp_path / "A01_0_Mito.tif").read_bytes())
    (tmp_path / "C03_0_ER.tif").write_bytes((tmp_path / "A01_0_ER.tif").read_bytes())
    err = _fails_before_writing(_embed_cli([manifest], weights, out, "--detect-channel", "Hoechst"), out, capsys)
    assert "channel 'Hoechst' not found" in err
    err = _fails_before_writing(_embed_cli([screen.plates[0]], weights, out, "--detect-channel", "dna"), out, capsys)
    assert "channel 'dna' not found (did you mean 'DNA'?)" in err and "field plate1/A01/0" in err
    err = _fails_before_writing(
        _embed_cli([manifest], weights, out, "--centroids", "labels", "--label-channel", "Nuclei"), out, capsys
    )
    assert "channel 'Nuclei' not found" in err
    empty = tmp_path / "empty.csv"
    empty.write_text(manifest.read_text().splitlines()[0] + "\n")
    err = _fails_before_writing(_embed_cli([manifest, empty], weights, out, *table), out, capsys)
    assert "empty.csv: [sources] the manifest lists no site" in err
    assert main(_embed_cli([manifest], weights, out, *table, "--crop-size", "32")) == 0  # the repaired manifest runs
    assert len(pd.read_parquet(out / "cells.parquet").groupby(["well", "site"])) == 3


def test_a_run_that_embeds_no_cell_exits_2_and_says_why(
    screen: object, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    blank = io.write_ome_zarr_plate(
        tmp_path / "blank.ome.zarr",
        {("A", "1", "0"): np.zeros((5, 64, 64), np.uint16), ("A", "2", "0"): np.full((5, 64, 64), 7, np.uint16)},
        CHANNELS,
    )
    assert main(_embed_cli([blank], weights, tmp_path / "blank")) == 2
    err = capsys.readouterr().err
    assert "no cell was embedded: detection found no nuclei in channel 'DNA' in any of the 2 fields" in err
    assert "--detect-channel" in err and not (tmp_path / "blank" / "embeddings.zarr").exists()
    table = ("--centroids", "table", "--nuclei-table", str(screen.nuclei))
    out = tmp_path / "skipped"
    assert main(_embed_cli(screen.plates, weights, out, *table, "--crop-size", "80", "--edge", "skip")) == 2
    err = capsys.readouterr().err
    n_cells = len(pd.read_csv(screen.nuclei))
    assert f"all {n_cells} cells were skipped by --edge skip (every 80-pixel crop crosses the field border)" in err
    assert "--edge pad" in err and not (out / "cells.parquet").exists()
    assert main(_embed_cli(screen.plates, weights, out, *table, "--crop-size", "80", "--edge", "skip")) == 2
    assert "skipped by --edge skip" in capsys.readouterr().err  # the rerun finds every field committed: same answer


def _five_channel_tiff(path: Path) -> bytes:
    data = np.arange(5 * 48 * 40, dtype=np.uint16).reshape(5, 48, 40)
    io.write_ome_tiff(path, data, list(CHANNELS))
    assert io.read_image(path).channel_names == list(CHANNELS)
    return path.read_bytes()


@pytest.mark.parametrize("keep", [0.999, 0.9, 0.5, 0.2])
def test_a_truncated_multichannel_ome_tiff_is_an_error_not_one_channel(tmp_path: Path, keep: float) -> None:
    raw = _five_channel_tiff(tmp_path / "whole.ome.tif")
    cut = tmp_path / "cut.ome.tif"
    cut.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(DinoscopeError, match="file is truncated") as err:
        io.read_image(cut)
    assert err.value.path == str(cut) and "copy or export the file again" in err.value.fix
    assert f"the file ends at byte {int(len(raw) * keep)}" in err.value.message


def test_an_ome_tiff_holding_fewer_planes_than_its_xml_declares_is_an_error(tmp_path: Path) -> None:
    raw = _five_channel_tiff(tmp_path / "whole.ome.tif")
    with tifffile.TiffFile(tmp_path / "whole.ome.tif") as tif:
        xml, planes = tif.ome_metadata, np.stack([page.asarray() for page in tif.pages[:3]])
    short = tmp_path / "short.ome.tif"  # a writer stopped after 3 of the 5 planes its OME-XML announced
    tifffile.imwrite(short, planes, description=xml, metadata=None, photometric="minisblack")
    with pytest.raises(DinoscopeError, match="its OME-XML declares 5 planes but the file holds 3") as err:
        io.read_image(short)
    assert err.value.path == str(short) and len(raw) > short.stat().st_size


def test_a_truncated_z_stack_in_a_manifest_stops_the_embedding_with_its_name(
    screen: object, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with io.read_image(screen.plates[0] / "A" / "1" / "0") as image:
        data = image.read()
    files = {}
    for name, plane in zip(CHANNELS, data, strict=True):
        stack = np.stack([plane, plane, plane])  # 3 z-planes; only z=0 is read, but the file must be whole
        io.write_ome_tiff(tmp_path / f"{name}.ome.tif", stack, [name], axes="ZYX")
        files[f"FileName_{name}"] = f"{name}.ome.tif"
    manifest = tmp_path / "load_data.csv"
    pd.DataFrame([{"Metadata_Plate": "plate1", "Metadata_Well": "A01", "Metadata_Site": "0", **files}]).to_csv(
        manifest, index=False
    )
    raw = (tmp_path / "RNA.ome.tif").read_bytes()
    (tmp_path / "RNA.ome.tif").write_bytes(raw[: len(raw) * 2 // 3])
    table = ("--centroids", "table", "--nuclei-table", str(screen.nuclei), "--crop-size", "32")
    assert main(_embed_cli([manifest], weights, tmp_path / "out", *table)) == 2
    err = capsys.readouterr().err
    assert "RNA.ome.tif" in err and "file is truncated" in err and "unexpected" not in err
    assert not (tmp_path / "out" / "embeddings.zarr").exists()
