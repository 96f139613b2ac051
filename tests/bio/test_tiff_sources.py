"""`dinoscope cells embed` on fields stored as multi-channel OME-TIFF files: folders and image lists from the command
line, plate/well/site from file names or a CSV, channels matched by name whatever their order; JUMP LoadData channel
names by the ``Orig`` rule or ``--channel-map``; and a failed attempt that never blocks the corrected command
(fixtures ``screen`` and ``weights`` come from ``conftest.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from bio import io
from bio.fields import field_channel_names, list_fields
from bio.synthetic import CHANNELS
from core.cli import main
from core.errors import DinoscopeError

TABLE = ("--centroids", "table", "--crop-size", "32", "--batch-size", "64")


def _fields(screen: object) -> list[tuple[str, str, np.ndarray]]:
    """(well, site, C x Y x X pixels in CHANNELS order) of every field of the screen's first plate."""
    out = []
    for well in ("A01", "A02", "A03", "B01", "B02", "B03", "C01", "C02", "C03"):
        for site in ("0", "1"):
            with io.read_image(screen.plates[0] / well[0] / str(int(well[1:])) / site) as image:
                out.append((well, site, image.read()))
    return out


def _load(run: Path) -> tuple[np.ndarray, pd.DataFrame]:
    emb = np.asarray(zarr.open_group(run / "embeddings.zarr", mode="r")["embeddings"][:])
    return emb, pd.read_parquet(run / "cells.parquet")


@pytest.fixture(scope="module")
def zarr_run(screen: object, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("zarr") / "run"
    args = [str(screen.plates[0]), "--weights", str(weights), "--nuclei-table", str(screen.nuclei), *TABLE]
    assert main(["cells", "embed", *args, "--out", str(run)]) == 0
    return run


def test_a_folder_of_five_channel_ome_tiffs_in_other_orders_embeds_by_channel_name(
    screen: object, weights: Path, zarr_run: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "plate1"
    folder.mkdir()
    orders = [["Mito", "AGP", "RNA", "ER", "DNA"], ["ER", "Mito", "DNA", "AGP", "RNA"]]
    for k, (well, site, data) in enumerate(_fields(screen)):
        order = orders[k % 2]  # two non-standard orders, alternating from file to file
        stack = data[[CHANNELS.index(name) for name in order]]
        io.write_ome_tiff(folder / f"plate1_{well}_s{site}.ome.tif", stack, order)
    common = ["--weights", str(weights), "--nuclei-table", str(screen.nuclei), *TABLE]
    run = tmp_path / "tiff"
    assert main(["cells", "embed", str(folder), *common, "--channels", ",".join(CHANNELS), "--out", str(run)]) == 0
    emb, cells = _load(run)
    want_emb, want_cells = _load(zarr_run)
    np.testing.assert_array_equal(emb, want_emb)  # bit-identical to the OME-Zarr plate
    pd.testing.assert_frame_equal(cells, want_cells)
    # without --channels the first file's order is used, and every other file is read in that order by name
    run = tmp_path / "file_order"
    assert main(["cells", "embed", str(folder), *common, "--out", str(run)]) == 0
    emb, _ = _load(run)
    blocks = [CHANNELS.index(name) for name in orders[0]]  # bag of channels: one 64-d block per channel
    np.testing.assert_array_equal(emb.reshape(len(emb), 5, -1), want_emb.reshape(len(emb), 5, -1)[:, blocks])
    attrs = zarr.open_group(run / "embeddings.zarr", mode="r").attrs.asdict()
    assert attrs["channel_names"] == orders[0]


def test_an_image_list_names_plate_well_and_site_of_arbitrary_file_names(
    screen: object, weights: Path, zarr_run: Path, tmp_path: Path
) -> None:
    rows = []
    for k, (well, site, data) in enumerate(_fields(screen)[:6]):
        io.write_ome_tiff(tmp_path / f"img{k:03d}.ome.tiff", data, list(CHANNELS))
        rows.append({"file": f"img{k:03d}.ome.tiff", "Metadata_Plate": "plate1", "Metadata_Well": well, "site": site})
    listing = tmp_path / "images.csv"
    pd.DataFrame(rows).to_csv(listing, index=False)
    run = tmp_path / "run"
    args = [str(listing), "--weights", str(weights), "--nuclei-table", str(screen.nuclei), *TABLE]
    assert main(["cells", "embed", *args, "--out", str(run)]) == 0
    emb, cells = _load(run)
    want_emb, want_cells = _load(zarr_run)
    first = want_cells["well"].isin(["A01", "A02", "A03"]).to_numpy()
    np.testing.assert_array_equal(emb, want_emb[first])
    assert cells[["plate", "well", "site"]].drop_duplicates().shape[0] == 6


def test_file_names_give_plate_well_and_site_by_the_documented_pattern(tmp_path: Path) -> None:
    data = np.zeros((2, 16, 16), np.uint16)
    folder = tmp_path / "BR00117010"
    folder.mkdir()
    for name in ("BR00117010_A1_s01", "BR00117010-P24-site2", "other_C03_field4", "BR00117010_B12"):
        io.write_ome_tiff(folder / f"{name}.ome.tif", data, ["DNA", "ER"])
    keys = [f.key for f in list_fields([folder])]
    assert keys == ["BR00117010/P24/2", "BR00117010/A01/1", "BR00117010/B12/0", "other/C03/4"]
    phenix = tmp_path / "phenix" / "plateX"
    phenix.mkdir(parents=True)
    tifffile.imwrite(phenix / "r02c05f03.tif", data)  # plain TIFF: no channel names
    pattern = r"r(?P<row>\d+)c(?P<column>\d+)f(?P<site>\d+)"
    fields = list_fields([phenix], name_pattern=pattern, channel_map={"ch0": "DNA", "ch1": "ER"})
    assert [f.key for f in fields] == ["plateX/B05/3"] and field_channel_names(fields[0]) == ["DNA", "ER"]
    io.write_ome_tiff(folder / "notes.ome.tif", data, ["DNA", "ER"])
    with pytest.raises(DinoscopeError, match=r"1 file name\(s\) do not match the name pattern .*: notes.ome.tif"):
        list_fields([folder])


def test_a_file_name_outside_the_pattern_fails_before_any_work(
    weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    io.write_ome_tiff(tmp_path / "scan 1.ome.tif", np.zeros((1, 16, 16), np.uint16), ["DNA"])
    out = tmp_path / "out"
    assert main(["cells", "embed", str(tmp_path), "--weights", str(weights), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "do not match the name pattern" in err and "scan 1.ome.tif" in err and "--name-pattern" in err
    assert not out.exists()


def _jump_manifest(screen: object, folder: Path) -> Path:
    """A JUMP-style LoadData CSV (FileName_OrigDNA ..., plus illumination-function columns) for three fields."""
    rows = []
    for well, site, data in _fields(screen)[:3]:
        row = {"Metadata_Plate": "plate1", "Metadata_Well": well, "Metadata_Site": site}
        for name, plane in zip(CHANNELS, data, strict=True):
            tifffile.imwrite(folder / f"{well}_{site}_{name}.tif", plane)
            row[f"FileName_Orig{name}"] = f"{well}_{site}_{name}.tif"
            row[f"FileName_Illum{name}"] = f"Illum{name}.npy"  # not an image: never read
        rows.append(row)
    manifest = folder / "load_data_with_illum.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def test_jump_loaddata_channel_names_match_and_a_failed_attempt_never_blocks_the_corrected_command(
    screen: object, weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    manifest = _jump_manifest(screen, tmp_path)
    out = tmp_path / "run"
    base = ["cells", "embed", str(manifest), "--weights", str(weights), "--out", str(out)]
    # the first attempt embeds nothing: every 80-pixel crop of a 64-pixel field crosses the border
    assert main([*base, "--crop-size", "80", "--edge", "skip"]) == 2
    assert "no cell was embedded" in capsys.readouterr().err
    assert not (out / "parts").exists() and not (out / "embed_config.json").exists()
    # a second attempt fails its up-front checks on the now existing directory: the raw column name is no channel
    assert main([*base, "--crop-size", "32", "--detect-channel", "OrigDNA"]) == 2
    assert "channel 'OrigDNA' not found; available channels: DNA, ER, RNA, AGP, Mito" in capsys.readouterr().err
    # corrected settings run at once, without --overwrite; detection finds its DNA in FileName_OrigDNA
    assert main([*base, "--crop-size", "32"]) == 0
    attrs = zarr.open_group(out / "embeddings.zarr", mode="r").attrs.asdict()
    assert attrs["channel_names"] == list(CHANNELS) and attrs["n_cells"] > 0
    config = json.loads((out / "embed_config.json").read_text())
    assert config["centroids"]["detect_channel"] == "DNA" and config["crops"]["size"] == 32
    # an explicit map renames the raw columns; the names it gives are the ones the run matches
    mapped = tmp_path / "mapped"
    argv = [*base[:-1], str(mapped), "--crop-size", "32", "--channel-map", "OrigDNA=Hoechst", "--detect-channel"]
    assert main([*argv, "Hoechst"]) == 0
    assert zarr.open_group(mapped / "embeddings.zarr", mode="r").attrs["channel_names"][0] == "Hoechst"
    assert main([*base[:-1], str(tmp_path / "bad"), "--channel-map", "OrigDNA"]) == 2
    assert "channel map item 'OrigDNA' is not OLD=NEW" in capsys.readouterr().err
