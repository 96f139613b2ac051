"""The reading side of ``dinoscope cells embed`` and its part files: a field prepared in a forked reader equals one
prepared here (crops cut once for QC and the model, batches as when crops were cut batch by batch), a reader's error
reaches the caller as raised, stopping early never waits for the readers, and rows files read back as written
(fixture ``screen`` comes from ``conftest.py``)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bio.cells import crop_cells
from bio.embed_fields import FieldResult
from bio.embed_reader import ReadPlan, prepare_field, start_reading
from bio.embed_store import PartWriter, read_commits, read_rows
from bio.fields import CentroidFinder, list_fields, open_field_image
from bio.profiles import normalise_well_name, normalise_well_names
from bio.qc import measure_field
from bio.synthetic import CHANNELS
from core.errors import DinoscopeError


def _plan(screen: object, edge: str = "pad", batch_size: int = 4) -> ReadPlan:
    finder = CentroidFinder("table", nuclei_table=screen.nuclei)
    return ReadPlan(finder, list(CHANNELS), 32, edge, CHANNELS.index("DNA"), batch_size)


@pytest.mark.parametrize("edge", ["pad", "skip"])
def test_a_prepared_field_holds_the_crops_batches_and_qc_of_the_batch_by_batch_cut(screen: object, edge: str) -> None:
    plan = _plan(screen, edge)
    for field in list_fields(screen.plates)[:6]:
        prepared = prepare_field(plan, field, lambda f=field: open_field_image(f))
        with open_field_image(field) as image:
            data = image.read()
            cents, ids = plan.finder.find(field, image)
        batches = [crop_cells(data, cents[s : s + 4], 32, edge=edge) for s in range(0, len(cents), 4)]
        assert [len(b.crops) for b in batches] == np.diff([*prepared.batches, len(prepared.crops)]).tolist()
        if batches:
            np.testing.assert_array_equal(prepared.crops, np.concatenate([b.crops for b in batches]))
            kept = np.concatenate([s * 4 + b.kept for s, b in enumerate(batches)])
            np.testing.assert_array_equal(prepared.ids, ids[kept])
            np.testing.assert_array_equal(prepared.cents, cents[kept])
        measured = measure_field(data, cents, 32, edge, plan.nuclear, 4)
        for key, value in measured.items():
            np.testing.assert_array_equal(prepared.measured[key], value)
        assert prepared.found == len(cents)


def test_forked_readers_give_what_this_process_gives_in_field_order(screen: object) -> None:
    plan, fields = _plan(screen), list_fields(screen.plates)
    wanted = [f.index for f in fields if f.index % 3]
    here = list(start_reading(plan, fields, wanted, prefetch=False))
    reading = start_reading(plan, fields, wanted, workers=2)
    forked = list(reading)
    reading.close()
    assert [p.field.index for p in forked] == [p.field.index for p in here] == wanted
    for a, b in zip(forked, here, strict=True):
        np.testing.assert_array_equal(a.crops, b.crops)
        np.testing.assert_array_equal(a.batches, b.batches)
        for key in b.measured:
            np.testing.assert_array_equal(a.measured[key], b.measured[key])


def test_a_readers_error_reaches_the_caller_as_raised(screen: object) -> None:
    plan, fields = _plan(screen), list_fields(screen.plates)
    broken = ReadPlan(plan.finder, [*CHANNELS[:2], "Actin"], 32, "pad", 0, 4)
    reading = start_reading(broken, fields, [f.index for f in fields], workers=2)
    with pytest.raises(DinoscopeError, match="channel 'Actin' not found") as caught:
        next(iter(reading))
    assert caught.value.field is not None
    started = time.monotonic()
    reading.close()
    assert time.monotonic() - started < 5


def test_stopping_early_does_not_wait_for_the_rest(screen: object) -> None:
    plan, fields = _plan(screen), list_fields(screen.plates)
    reading = start_reading(plan, fields, [f.index for f in fields], workers=2)
    first = next(iter(reading))
    assert first.field.index == 0
    started = time.monotonic()
    reading.close()
    assert time.monotonic() - started < 5


def test_rows_files_read_back_as_written_and_old_npz_parts_still_read(screen: object, tmp_path: Path) -> None:
    field = list_fields(screen.plates)[0]
    rng = np.random.default_rng(0)
    n = 5
    result = FieldResult(
        rng.normal(size=(n, 8)).astype(np.float16),
        np.arange(n, dtype=np.int64),
        rng.uniform(size=n),
        rng.uniform(size=n),
        np.array([True, False, False, True, False]),
        rng.uniform(size=(n, 3)).astype(np.float32),
        np.zeros(n, np.float32),
        np.full(n, np.nan, np.float32),
        rng.uniform(size=(n, 2)).astype(np.float32),
    )
    part = PartWriter(tmp_path / "rank-0000")
    part.append(field, result, 0.1, found=7)
    empty = FieldResult(*(np.zeros((0, *v.shape[1:]), v.dtype) for v in vars(result).values()))
    part.append(list_fields(screen.plates)[1], empty, 0.1)
    records = read_commits(part.dir)
    assert [r["rows"] for r in records] == ["field-00000000.rows", "field-00000001.rows"]
    for record, want in zip(records, (result, empty), strict=True):
        got = read_rows(part.dir, record)
        for key, value in vars(want).items():
            assert got[key].dtype == value.dtype and got[key].shape == value.shape
            np.testing.assert_array_equal(got[key], value)
    np.savez(part.dir / "field-00000009.npz", **vars(result))  # a part written before the rows format
    old = read_rows(part.dir, {"rows": "field-00000009.npz"})
    np.testing.assert_array_equal(old["embeddings"], result.embeddings)


def test_one_well_name_is_normalised_like_a_column_of_them() -> None:
    wells = ["a1", "A1", "A001", " b12 ", "P24", "A0", "AA3", "X", "1A", "", "A01x", "aB007"]
    assert [normalise_well_name(w) for w in wells] == normalise_well_names(pd.Series(wells)).tolist()
