"""Readers and writers of bio.io: OME-TIFF, OME-Zarr images and plates (NGFF 0.4/0.5), LoadData manifests, bad input."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from bio import io
from bio.io import ChannelSource, ChannelStack
from core.errors import DinoscopeError

REAL = Path(__file__).parents[1] / "data" / "real"
NAMES = ["DNA", "ER", "RNA", "AGP", "Mito"]


def _field(seed: int, dtype: str = "uint16", shape: tuple[int, ...] = (5, 24, 32)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.random(shape, dtype=np.float32)
    return rng.integers(0, np.iinfo(dtype).max, shape).astype(dtype)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_ome_tiff_roundtrip_preserves_names_dtype_and_reorders_by_name(tmp_path: Path, dtype: str) -> None:
    data = _field(0, dtype)
    path = io.write_ome_tiff(tmp_path / "field.ome.tif", data, NAMES, pixel_size=0.65)
    image = io.read_image(path)
    assert image.channel_names == NAMES
    assert image.dtype == np.dtype(dtype) and image.shape == (5, 24, 32)
    assert image.pixel_size == pytest.approx(0.65)
    np.testing.assert_array_equal(image.read(), data)
    picked = io.read_image(path, channels=["Mito", "DNA"])
    assert picked.channel_names == ["Mito", "DNA"]
    np.testing.assert_array_equal(picked.read(), data[[4, 0]])
    np.testing.assert_array_equal(picked.channel("DNA"), data[0])


def test_ome_tiff_tczyx_takes_first_plane_or_max_projection(tmp_path: Path) -> None:
    data = _field(1, shape=(2, 3, 4, 16, 20))  # T C Z Y X
    path = io.write_ome_tiff(tmp_path / "stack.ome.tif", data, ["DNA", "ER", "RNA"], axes="TCZYX")
    first = io.read_image(path, ["RNA", "DNA"])
    np.testing.assert_array_equal(first.read(), data[0, [2, 0], 0])
    projected = io.read_image(path, ["ER"], z_projection="max", timepoint=1)
    np.testing.assert_array_equal(projected.read()[0], data[1, 1].max(axis=0))
    czyx = io.write_ome_tiff(
        tmp_path / "czyx.ome.tif", data[0].transpose(1, 0, 2, 3), ["DNA", "ER", "RNA"], axes="ZCYX"
    )
    np.testing.assert_array_equal(io.read_image(czyx, ["ER"], z_projection="max").read()[0], data[0, 1].max(0))
    with pytest.raises(DinoscopeError, match="timepoint 5"):
        io.read_image(path, timepoint=5)


def test_reads_are_lazy_windows_of_the_requested_channel(tmp_path: Path) -> None:
    data = _field(2)
    image = io.read_image(io.write_ome_tiff(tmp_path / "f.ome.tif", data, NAMES))
    assert isinstance(image.data.sources[0].array, zarr.Array)  # backed by tifffile's zarr store, not an ndarray
    np.testing.assert_array_equal(image.data[3, 5:9, 2:30:3], data[3, 5:9, 2:30:3])

    class Recording:
        def __init__(self, array: np.ndarray) -> None:
            self.array, self.shape, self.dtype, self.keys = array, array.shape, array.dtype, []

        def __getitem__(self, key: tuple) -> np.ndarray:
            self.keys.append(key)
            return self.array[key]

    spy = Recording(data)
    stack = ChannelStack([ChannelSource(spy, "cyx", {"c": i}) for i in range(5)])
    np.testing.assert_array_equal(stack[[4, 1], 2:6, :5], data[[4, 1], 2:6, :5])
    assert spy.keys == [(4, slice(2, 6), slice(None, 5)), (1, slice(2, 6), slice(None, 5))]


def test_real_plain_tiff_gets_default_or_given_channel_name() -> None:
    path = REAL / "nuclei_dsb2018_img.tif"
    expected = tifffile.imread(path)
    image = io.read_image(path)
    assert image.channel_names == ["ch0"] and image.pixel_size is None
    named = io.read_image(path, ["DNA"], channel_names=["DNA"])
    np.testing.assert_array_equal(named.read()[0], expected)
    with pytest.raises(DinoscopeError, match="2 names but the image has 1"):
        io.read_image(path, channel_names=["DNA", "ER"])


def test_unknown_channel_lists_the_available_ones(tmp_path: Path) -> None:
    path = io.write_ome_tiff(tmp_path / "f.ome.tif", _field(3), NAMES)
    with pytest.raises(DinoscopeError) as err:
        io.read_image(path, ["dna"])
    assert "available channels: DNA, ER, RNA, AGP, Mito" in str(err.value)
    assert "did you mean 'DNA'" in str(err.value)
    assert err.value.field == "dna" and err.value.path == str(path)


def test_duplicate_channel_names_in_a_file_are_rejected(tmp_path: Path) -> None:
    path = io.write_ome_tiff(tmp_path / "dup.ome.tif", _field(4, shape=(2, 8, 8)), ["DNA", "DNA"])
    with pytest.raises(DinoscopeError, match="duplicate channel names"):
        io.read_image(path)
    assert io.read_image(path, channel_names=["DNA", "DNA2"]).channel_names == ["DNA", "DNA2"]


def test_ome_tiff_channel_names_that_look_like_numbers_stay_text(tmp_path: Path) -> None:
    names = ["0405", "1.50", "true", "DNA,ER", "1e3"]  # tifffile.xml2dict would give 405, 1.5, True, ..., 1000.0
    path = io.write_ome_tiff(
        tmp_path / "lasers.ome.tif", _field(11, shape=(5, 8, 8)), names, pixel_size=325, axes="CYX"
    )
    image = io.read_image(path)
    assert image.channel_names == names and image.pixel_size == pytest.approx(325)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_plate_roundtrip(tmp_path: Path, version: str) -> None:
    keys = [(row, col, fld) for row in "AB" for col in ("1", "2", "10") for fld in ("0", "1")]
    images = {key: _field(seed, shape=(5, 16, 20)) for seed, key in enumerate(keys)}
    path = io.write_ome_zarr_plate(tmp_path / "p.ome.zarr", images, NAMES, version=version, pixel_size=0.5)
    if version == "0.4":
        assert json.loads((path / "A" / "1" / ".zattrs").read_text())["well"]["version"] == "0.4"
        assert json.loads((path / "A" / "1" / "0" / "0" / ".zarray").read_text())["dimension_separator"] == "/"
    else:
        meta = json.loads((path / "zarr.json").read_text())
        assert meta["zarr_format"] == 3 and meta["attributes"]["ome"]["version"] == "0.5"
    layout = io.plate_layout(path)
    assert layout.version == version and layout.name == "p"
    assert layout.rows == ["A", "B"] and layout.columns == ["1", "2", "10"]
    assert [w.path for w in layout.wells][:3] == ["A/1", "A/2", "A/10"] and layout.n_fields == 12
    seen = set()
    for row, col, fld, image in io.iter_fields(path, ["RNA", "DNA"]):
        assert image.channel_names == ["RNA", "DNA"] and image.pixel_size == pytest.approx(0.5)
        np.testing.assert_array_equal(image.read(), images[(row, col, fld)][[2, 0]])
        seen.add((row, col, fld))
    assert seen == set(images)
    single = io.read_image(path / "B" / "10" / "1", ["Mito"])
    np.testing.assert_array_equal(single.read()[0], images[("B", "10", "1")][4])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside ome-zarr's own writer defaults
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_reads_a_plate_written_by_ome_zarr_with_pyramids_and_z(tmp_path: Path, version: str) -> None:
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    fmt = FormatV04() if version == "0.4" else FormatV05()
    root = zarr.open_group(str(tmp_path / "ext.zarr"), mode="w", zarr_format=fmt.zarr_format)
    write_plate_metadata(root, ["C"], ["3"], ["C/3"], fmt=fmt, name="external")
    well = root.require_group("C").require_group("3")
    write_well_metadata(well, [{"path": "fov7"}], fmt=fmt)  # a non-numeric field path: must come from metadata
    data = _field(5, "uint8", (2, 3, 32, 32))  # C Z Y X
    window = {"min": 0, "max": 255, "start": 0, "end": 255}
    write_image(
        data,
        well.create_group("fov7"),
        axes="czyx",
        fmt=fmt,
        scale_factors=[2],
        omero={
            "channels": [
                {"label": "DNA", "color": "0000FF", "window": window},
                {"label": "Mito", "color": "FF0000", "window": window},
            ]
        },
    )
    [(row, col, fld, image)] = list(io.iter_fields(tmp_path / "ext.zarr", ["Mito"], z_projection="max"))
    assert (row, col, fld) == ("C", "3", "fov7") and image.metadata["axes"] == "czyx"
    np.testing.assert_array_equal(image.read()[0], data[1].max(axis=0))


def test_our_plate_is_understood_by_the_ome_zarr_reader(tmp_path: Path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    images = {("A", "1", "0"): _field(6, shape=(5, 16, 16)), ("A", "2", "0"): _field(7, shape=(5, 16, 16))}
    path = io.write_ome_zarr_plate(tmp_path / "ours.ome.zarr", images, NAMES)
    plate_nodes = list(Reader(parse_url(str(path)))())
    assert "Plate" in [type(spec).__name__ for spec in plate_nodes[0].specs]
    field_node = list(Reader(parse_url(str(path / "A" / "2" / "0")))())[0]
    assert field_node.metadata["channel_names"] == NAMES
    np.testing.assert_array_equal(np.asarray(field_node.data[0]), images[("A", "2", "0")])


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_our_plates_pass_the_ngff_models_without_warnings(tmp_path: Path, version: str) -> None:
    pytest.importorskip("ome_zarr_models")  # an independent NGFF schema check, where installed
    from ome_zarr_models.v04.hcs import HCS as HCS04
    from ome_zarr_models.v05.hcs import HCS as HCS05

    images = {(r, c, f): _field(10, shape=(5, 8, 8)) for r in "AB" for c in ("2", "11") for f in "01"}
    path = io.write_ome_zarr_plate(tmp_path / "p.ome.zarr", images, NAMES, version=version, pixel_size=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a 0.5 plate without plate.version is accepted only with a warning
        hcs = (HCS04 if version == "0.4" else HCS05).from_zarr(zarr.open_group(str(path), mode="r"))
    assert len(list(hcs.well_groups)) == 4


def _write_manifest(tmp_path: Path, rows: list[dict[str, str]]) -> Path:
    path = tmp_path / "load_data.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_manifest_roundtrip_with_relative_and_absolute_paths(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    fields = {}
    rows = []
    for site in ("1", "2"):
        data = _field(int(site), shape=(3, 12, 14))
        fields[site] = data
        row = {"Metadata_Plate": "BR01", "Metadata_Well": "A01", "Metadata_Site": site}
        for c, name in enumerate(["OrigDNA", "OrigER", "OrigMito"]):
            tifffile.imwrite(tmp_path / "images" / f"s{site}_{name}.tif", data[c])
            folder = "images" if c == 0 else str(tmp_path / "images")  # relative to the CSV, then absolute
            row |= {f"FileName_{name}": f"s{site}_{name}.tif", f"PathName_{name}": folder}
        rows.append(row)
    manifest = _write_manifest(tmp_path, rows)
    parsed = io.read_manifest(manifest)
    assert [(f.plate, f.well, f.site, f.line) for f in parsed] == [("BR01", "A01", "1", 2), ("BR01", "A01", "2", 3)]
    assert parsed[0].channel_names == ["DNA", "ER", "Mito"]  # JUMP's Orig prefix of raw images is dropped
    assert parsed[0].channel_columns == {"DNA": "OrigDNA", "ER": "OrigER", "Mito": "OrigMito"}
    out = list(io.iter_manifest_fields(manifest, ["Mito", "DNA"]))
    assert [(p, w, s) for p, w, s, _ in out] == [("BR01", "A01", "1"), ("BR01", "A01", "2")]
    for _, _, site, image in out:
        assert image.channel_names == ["Mito", "DNA"]
        np.testing.assert_array_equal(image.read(), fields[site][[2, 0]])
    mapped = io.read_manifest(manifest, channel_map={"OrigDNA": "Hoechst"})  # an explicit map wins over the rule
    assert mapped[0].channel_names == ["Hoechst", "ER", "Mito"]


def test_manifest_missing_file_names_the_line_and_file(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((4, 4), np.uint16))
    rows = [
        {"Metadata_Plate": "P", "Metadata_Well": "A01", "Metadata_Site": "1", "FileName_DNA": "a.tif"},
        {"Metadata_Plate": "P", "Metadata_Well": "A01", "Metadata_Site": "2", "FileName_DNA": "gone.tif"},
    ]
    with pytest.raises(DinoscopeError) as err:
        io.read_manifest(_write_manifest(tmp_path, rows))
    assert "line 3" in str(err.value) and "gone.tif" in str(err.value)
    assert err.value.field == "FileName_DNA" and err.value.path.endswith("load_data.csv")


def test_manifest_without_metadata_columns_is_rejected(tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path, [{"Metadata_Plate": "P", "FileName_DNA": "a.tif"}])
    with pytest.raises(DinoscopeError, match=r"missing columns \['Metadata_Well', 'Metadata_Site'\]"):
        io.read_manifest(manifest)


def test_real_tiff_cut_in_half_is_reported_as_truncated(tmp_path: Path) -> None:
    raw = (REAL / "nuclei_dsb2018_img.tif").read_bytes()
    half = tmp_path / "half.tif"
    half.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DinoscopeError, match="truncated") as err:
        io.read_image(half)
    assert err.value.path == str(half) and err.value.fix
    stub = tmp_path / "stub.tif"
    stub.write_bytes(raw[:100])
    with pytest.raises(DinoscopeError, match="not a readable TIFF|unreadable TIFF"):
        io.read_image(stub)


def test_corrupt_pixels_found_at_read_time_raise_a_dinoscope_error(tmp_path: Path) -> None:
    class Broken:
        shape, dtype = (8, 8), np.dtype("uint16")

        def __getitem__(self, key: tuple) -> np.ndarray:
            raise ValueError("decompression failed")

    stack = ChannelStack([ChannelSource(Broken(), "yx", {}, path="x.tif", name="DNA")])
    with pytest.raises(DinoscopeError, match="could not read pixel data") as err:
        stack[0]
    assert err.value.field == "DNA" and err.value.path == "x.tif"


def _plate(tmp_path: Path, version: str = "0.5") -> Path:
    images = {(r, c, "0"): _field(8, shape=(5, 8, 8)) for r in "A" for c in "12"}
    return io.write_ome_zarr_plate(tmp_path / "p.ome.zarr", images, NAMES, version=version)


def test_plate_without_plate_metadata_is_rejected(tmp_path: Path) -> None:
    path = _plate(tmp_path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"] = {}
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(DinoscopeError, match="not an OME-Zarr HCS plate") as err:
        io.plate_layout(path)
    assert err.value.field == "plate"


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_well_listed_but_absent_is_named(tmp_path: Path, version: str) -> None:
    path = _plate(tmp_path, version)
    shutil.rmtree(path / "A" / "2")
    with pytest.raises(DinoscopeError, match="'A/2' is listed in the plate metadata but missing") as err:
        list(io.iter_fields(path))
    assert err.value.field == "plate.wells[1].path" and "restore" in err.value.fix


def test_plate_root_given_as_an_image_points_to_iter_fields(tmp_path: Path) -> None:
    path = _plate(tmp_path)
    with pytest.raises(DinoscopeError, match="not an OME-Zarr image") as err:
        io.read_image(path)
    assert "iter_fields" in err.value.fix
    with pytest.raises(DinoscopeError, match="not found"):
        io.read_image(tmp_path / "nowhere.ome.zarr")


def test_plate_writer_validates_input(tmp_path: Path) -> None:
    with pytest.raises(DinoscopeError, match="expected C x Y x X with C = 5"):
        io.write_ome_zarr_plate(tmp_path / "bad.ome.zarr", {("A", "1", "0"): np.zeros((3, 4, 4))}, NAMES)
    assert not (tmp_path / "bad.ome.zarr").exists()  # atomic: nothing half-written
    path = _plate(tmp_path)
    with pytest.raises(DinoscopeError, match="already exists"):
        _plate(tmp_path)
    assert io.write_ome_zarr_plate(path, [(("B", "3", "0"), _field(9, shape=(5, 8, 8)))], NAMES, overwrite=True)
    assert [w.path for w in io.plate_layout(path).wells] == ["B/3"]
