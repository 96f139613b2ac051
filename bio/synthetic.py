"""Seeded synthetic Cell Painting screens written as OME-Zarr HCS plates, with a platemap and a nuclei table.

Five channels as in the Cell Painting assay (Bray et al., Nature Protocols 2016): DNA (Hoechst, nuclei), ER
(concanavalin A), RNA (SYTO 14: nucleoli and cytoplasmic RNA), AGP (phalloidin + WGA: actin, Golgi, plasma membrane)
and Mito (MitoTracker). Each cell is an elliptical cytoplasm around an elliptical nucleus.

Treatments move morphology in known directions (:data:`TREATMENTS`); "inert" treatments draw from exactly the same
distribution as the DMSO negative control, so a profiling method should call them inactive. Every plate carries
control wells and plate-level batch effects (per-channel gain and offset, an illumination gradient), so plate
normalisation and illumination correction have something to correct.

Every field is drawn from its own random stream keyed by ``(seed, plate, well, field)``, so output is reproducible
and independent of the order in which fields are generated.

For testing quality control, defects can be planted: ``blurred_fields`` fields per plate are out of focus (the optical
image is blurred before camera noise is added), and every field of ``saturated_wells`` wells per plate is exposed
``SATURATION_EXPOSURE`` times too long, so bright structures clip at the 16-bit full scale. Which ones were planted
is returned (:attr:`SyntheticScreen.planted`) and written to ``planted.json``.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from scipy.ndimage import gaussian_filter

from bio.io import well_name, write_ome_zarr_plate
from core.errors import DinoscopeError
from core.io import atomic_path, write_json

CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
NUCLEUS_RADIUS = 6.0  # pixels, DMSO
CELL_RADIUS = 13.0
_COUNTS_SCALE, _COUNTS_BACKGROUND = 4000.0, 100.0  # arbitrary units -> 16-bit camera counts
BLUR_SIGMA = 2.5  # pixels: the defocus of a planted blurred field
SATURATION_EXPOSURE = 40.0  # exposure factor of a planted saturated well: nuclei and membranes clip


@dataclass(frozen=True)
class Phenotype:
    """How a treatment changes cells; the defaults are the DMSO phenotype."""

    nucleus_scale: float = 1.0  # multiplies nucleus radii
    er_gain: float = 1.0  # multiplies ER stain intensity
    mito_fragmentation: float = 0.0  # 0: tubular network, 1: small puncta
    rna_granules: float = 1.0  # multiplies the density of cytoplasmic RNA granules
    elongation: float = 1.0  # multiplies the cell's aspect ratio


@dataclass(frozen=True)
class Treatment:
    """A synthetic treatment: its plate-map role and the :class:`Phenotype` its cells get."""

    role: Literal["negative_control", "active", "inert"]
    phenotype: Phenotype = field(default_factory=Phenotype)


TREATMENTS: dict[str, Treatment] = {
    "DMSO": Treatment("negative_control"),
    "nucleus_enlarger": Treatment("active", Phenotype(nucleus_scale=1.35)),
    "er_stressor": Treatment("active", Phenotype(er_gain=1.8)),
    "mito_fragmenter": Treatment("active", Phenotype(mito_fragmentation=1.0)),
    "rna_granulator": Treatment("active", Phenotype(rna_granules=4.0)),
    "cell_elongator": Treatment("active", Phenotype(elongation=2.0)),
    "inert_a": Treatment("inert"),
    "inert_b": Treatment("inert"),
}


@dataclass(frozen=True)
class SyntheticScreen:
    """Paths written by :func:`make_plate`."""

    root: Path
    plates: list[Path]
    platemap: Path
    nuclei: Path
    channel_names: tuple[str, ...] = CHANNELS
    planted: dict[str, list[str]] = field(default_factory=dict)  # blurred_fields (plate/well/site), saturated_wells


def make_plate(
    out_path: str | os.PathLike,
    *,
    n_rows: int = 4,
    n_cols: int = 6,
    fields: int = 2,
    size: int = 128,
    seed: int = 0,
    plates: int = 2,
    version: Literal["0.4", "0.5"] = "0.5",
    cells_per_field: int | None = None,
    blurred_fields: int = 0,
    saturated_wells: int = 0,
) -> SyntheticScreen:
    """Write ``plates`` synthetic plates under ``out_path`` plus ``platemap.csv`` and ``nuclei.csv``.

    Plates are ``<out_path>/plate<k>.ome.zarr`` with fields ``{row}/{column}/{field}``; in the CSVs wells are named
    ``A01`` (see :func:`bio.io.well_name`) and ``site`` is the field index. ``nuclei.csv`` holds the true nucleus
    centres as CellProfiler's ``Nuclei_Location_Center_X/Y``. ``blurred_fields`` and ``saturated_wells`` plant that
    many defective fields and wells per plate (see the module docstring); ``planted.json`` lists them.

    Example::

        from bio import make_plate
        screen = make_plate("data/screen", plates=2, n_rows=4, n_cols=6)
        screen.plates, screen.platemap, screen.nuclei   # two .ome.zarr plates and two CSVs
    """
    n_wells = n_rows * n_cols
    n_treated = len(TREATMENTS) - 1
    if n_rows < 1 or n_rows > 26 or n_cols < 1 or n_wells < n_treated + 2:
        raise DinoscopeError(
            f"a {n_rows} x {n_cols} plate cannot hold {n_treated} treatments plus 2 control wells",
            field="n_rows/n_cols",
            fix=f"use at least {n_treated + 2} wells and at most 26 rows",
        )
    if size < 4 * CELL_RADIUS or fields < 1 or plates < 1:
        raise DinoscopeError(
            f"size={size}, fields={fields}, plates={plates} too small",
            field="size",
            fix=f"use size >= {int(4 * CELL_RADIUS)} and at least one field and plate",
        )
    if saturated_wells > n_wells or blurred_fields > (n_wells - saturated_wells) * fields:
        raise DinoscopeError(
            f"cannot plant {saturated_wells} saturated wells and {blurred_fields} blurred fields in {n_wells} wells "
            f"of {fields} fields",
            field="blurred_fields",
            fix="plant fewer defects than the plate has wells and fields",
        )
    root = Path(out_path)
    root.mkdir(parents=True, exist_ok=True)
    n_cells = cells_per_field or max(1, round(0.35 * size * size / (math.pi * CELL_RADIUS**2)))
    platemap_rows, nuclei_rows, plate_paths = [], [], []
    planted: dict[str, list[str]] = {"blurred_fields": [], "saturated_wells": []}
    for plate_index in range(plates):
        plate = f"plate{plate_index + 1}"
        layout = _plate_layout(n_rows, n_cols, np.random.default_rng([seed, plate_index, 1]))
        for (row, column), treatment in layout.items():
            platemap_rows.append([plate, well_name(row, column), treatment, TREATMENTS[treatment].role])
        batch = _BatchEffect.draw(np.random.default_rng([seed, plate_index, 2]), size)
        blurred, saturated = _plant(
            np.random.default_rng([seed, plate_index, 4]), n_wells, fields, blurred_fields, saturated_wells
        )
        wells = [well_name(row, column) for row, column in layout]
        planted["saturated_wells"] += [f"{plate}/{wells[w]}" for w in sorted(saturated)]
        planted["blurred_fields"] += [f"{plate}/{wells[w]}/{site}" for w, site in sorted(blurred)]

        def fields_of_plate(
            plate: str = plate,
            plate_index: int = plate_index,
            layout: dict = layout,
            batch: _BatchEffect = batch,
            blurred: set = blurred,
            saturated: set = saturated,
        ) -> Iterator[tuple[tuple[str, str, str], np.ndarray]]:
            for well_index, ((row, column), treatment) in enumerate(layout.items()):
                for site in range(fields):
                    rng = np.random.default_rng([seed, plate_index, 3, well_index, site])
                    image, centres = _render_field(
                        rng,
                        size,
                        n_cells,
                        TREATMENTS[treatment].phenotype,
                        batch,
                        blur=BLUR_SIGMA if (well_index, site) in blurred else 0.0,
                        exposure=SATURATION_EXPOSURE if well_index in saturated else 1.0,
                    )
                    nuclei_rows.extend(
                        [plate, well_name(row, column), site, i + 1, x, y] for i, (y, x) in enumerate(centres)
                    )
                    yield (row, column, str(site)), image

        path = root / f"{plate}.ome.zarr"
        write_ome_zarr_plate(path, fields_of_plate(), CHANNELS, version=version, plate_name=plate, overwrite=True)
        plate_paths.append(path)
    platemap = _write_csv(root / "platemap.csv", ["plate", "well", "treatment", "role"], platemap_rows)
    nuclei = _write_csv(
        root / "nuclei.csv",
        ["plate", "well", "site", "ObjectNumber", "Nuclei_Location_Center_X", "Nuclei_Location_Center_Y"],
        nuclei_rows,
    )
    write_json(root / "planted.json", planted)
    return SyntheticScreen(root=root, plates=plate_paths, platemap=platemap, nuclei=nuclei, planted=planted)


def _plant(
    rng: np.random.Generator, n_wells: int, fields: int, n_blurred: int, n_saturated: int
) -> tuple[set[tuple[int, int]], set[int]]:
    """Which wells are saturated and which (well, field) pairs of the other wells are blurred."""
    saturated = {int(w) for w in rng.permutation(n_wells)[:n_saturated]}
    candidates = [(w, s) for w in range(n_wells) if w not in saturated for s in range(fields)]
    blurred = {candidates[int(i)] for i in rng.permutation(len(candidates))[:n_blurred]}
    return blurred, saturated


def _plate_layout(n_rows: int, n_cols: int, rng: np.random.Generator) -> dict[tuple[str, str], str]:
    """About a quarter of the wells (at least 2) are DMSO; the rest cycle through the other treatments."""
    wells = [(chr(ord("A") + r), str(c + 1)) for r in range(n_rows) for c in range(n_cols)]
    n_controls = max(2, len(wells) // 4)
    others = [name for name in TREATMENTS if TREATMENTS[name].role != "negative_control"]
    assigned = ["DMSO"] * n_controls + [others[i % len(others)] for i in range(len(wells) - n_controls)]
    position = rng.permutation(len(wells))  # well i receives assigned[position[i]]
    return {well: assigned[position[i]] for i, well in enumerate(wells)}


@dataclass(frozen=True)
class _BatchEffect:
    gain: np.ndarray  # per channel
    offset: np.ndarray  # per channel, arbitrary units
    illumination: np.ndarray  # Y x X multiplicative field, shared by channels

    @classmethod
    def draw(cls, rng: np.random.Generator, size: int) -> _BatchEffect:
        coords = (np.arange(size) - (size - 1) / 2) / (size / 2)
        yy, xx = np.meshgrid(coords, coords, indexing="ij")
        angle = rng.uniform(0, 2 * np.pi)
        slope, vignette = rng.uniform(0.05, 0.2), rng.uniform(0.1, 0.3)
        centre = rng.uniform(-0.3, 0.3, size=2)
        illumination = (
            1
            + slope * (np.cos(angle) * xx + np.sin(angle) * yy)
            - vignette * ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / 2
        )
        return cls(
            gain=rng.uniform(0.75, 1.25, len(CHANNELS)),
            offset=rng.uniform(0.03, 0.08, len(CHANNELS)),
            illumination=illumination.astype(np.float32),
        )


def _render_field(
    rng: np.random.Generator,
    size: int,
    n_cells: int,
    pheno: Phenotype,
    batch: _BatchEffect,
    *,
    blur: float = 0.0,
    exposure: float = 1.0,
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """One ``5 x size x size`` uint16 field and its nucleus centres ``(y, x)``; ``blur`` defocuses the optical image
    (Gaussian sigma in pixels) and ``exposure`` multiplies the light collected."""
    maps = {name: np.zeros((size, size), np.float32) for name in ("nuc", "cyto", "er", "agp", "nucleoli")}
    centres = []
    for cy, cx in _place_cells(rng, size, n_cells, NUCLEUS_RADIUS * pheno.nucleus_scale + 2):
        _draw_cell(rng, maps, cy, cx, pheno)
        centres.append((cy, cx))
    cyto = maps["cyto"]

    def texture(sigma: float) -> np.ndarray:
        return _unit(gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), sigma))

    granules = np.zeros((size, size), np.float32)
    n_granules = rng.poisson(0.004 * size * size * pheno.rna_granules)
    granules[rng.integers(0, size, n_granules), rng.integers(0, size, n_granules)] = 1.0
    granules = gaussian_filter(granules, 0.8) * 2 * np.pi * 0.8**2  # unit-peak spots
    tubular = np.clip(texture(2.0) * 1.6 - 0.3, 0, 1)
    puncta = np.clip(texture(0.7) * 2.5 - 1.0, 0, 1)
    puncta *= tubular.mean() / max(puncta.mean(), 1e-6)  # same mean signal, different texture
    mito = (1 - pheno.mito_fragmentation) * tubular + pheno.mito_fragmentation * puncta
    clean = np.stack(
        [
            maps["nuc"] * (0.85 + 0.3 * texture(1.5)),
            0.6 * pheno.er_gain * maps["er"],
            0.25 * cyto + maps["nucleoli"] + 0.8 * granules * np.minimum(cyto, 1.0),
            maps["agp"],
            0.9 * cyto * mito,
        ]
    )
    # the illumination falls on the cells and on the autofluorescent background alike; the camera offset is added later
    signal = exposure * batch.illumination * (batch.gain[:, None, None] * clean + batch.offset[:, None, None])
    if blur > 0:
        signal = gaussian_filter(signal, sigma=(0, blur, blur))
    # read noise plus shot noise that grows with the square root of the signal
    noise_scale = 0.01 + 0.02 * np.sqrt(np.maximum(signal, 0))
    noisy = signal + noise_scale * rng.standard_normal(signal.shape, dtype=np.float32)
    counts = np.clip(noisy * _COUNTS_SCALE + _COUNTS_BACKGROUND, 0, np.iinfo(np.uint16).max)
    return counts.astype(np.uint16), centres


def _place_cells(rng: np.random.Generator, size: int, n_cells: int, margin: float) -> list[tuple[float, float]]:
    """Rejection sampling: nuclei stay inside the field and cells overlap only a little."""
    placed: list[tuple[float, float]] = []
    for _ in range(50 * n_cells):
        if len(placed) == n_cells:
            break
        y, x = rng.uniform(margin, size - 1 - margin, size=2)
        if all((y - py) ** 2 + (x - px) ** 2 >= (1.6 * CELL_RADIUS) ** 2 for py, px in placed):
            placed.append((float(y), float(x)))
    return placed


def _draw_cell(
    rng: np.random.Generator,
    maps: dict[str, np.ndarray],
    cy: float,
    cx: float,
    pheno: Phenotype,
) -> None:
    """Add one cell's nucleus, cytoplasm, perinuclear ER, membrane/Golgi and nucleoli to the field maps."""
    size = maps["nuc"].shape[0]
    theta = rng.uniform(0, np.pi)
    aspect = rng.uniform(1.0, 1.4) * pheno.elongation
    jitter = rng.uniform(0.9, 1.1)
    cell_a, cell_b = CELL_RADIUS * jitter * math.sqrt(aspect), CELL_RADIUS * jitter / math.sqrt(aspect)
    nuc_aspect = rng.uniform(1.0, 1.25)
    nuc_r = NUCLEUS_RADIUS * pheno.nucleus_scale * rng.uniform(0.9, 1.1)
    nuc_a, nuc_b = nuc_r * math.sqrt(nuc_aspect), nuc_r / math.sqrt(nuc_aspect)
    # the cell body is shifted off the nucleus a little; the nucleus centre is the recorded centroid
    body_y, body_x = cy + rng.normal(0, 1.0), cx + rng.normal(0, 1.0)
    half = int(math.ceil(max(cell_a, cell_b) + 4))
    y0, y1 = max(int(body_y) - half, 0), min(int(body_y) + half + 1, size)
    x0, x1 = max(int(body_x) - half, 0), min(int(body_x) + half + 1, size)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    cos, sin = math.cos(theta), math.sin(theta)
    r_cell = _ellipse_radius(yy - body_y, xx - body_x, cos, sin, cell_a, cell_b)
    r_nuc = _ellipse_radius(yy - cy, xx - cx, cos, sin, nuc_a, nuc_b)
    nucleus = _soft_inside(r_nuc, nuc_r)
    body = np.maximum(_soft_inside(r_cell, CELL_RADIUS), nucleus)
    cytoplasm = body * (1 - nucleus)
    brightness = rng.uniform(0.8, 1.2)
    window = (slice(y0, y1), slice(x0, x1))
    maps["nuc"][window] += brightness * nucleus
    maps["cyto"][window] += brightness * cytoplasm
    perinuclear = np.exp(-np.maximum(r_nuc - 1, 0) * nuc_r / (0.5 * CELL_RADIUS))
    maps["er"][window] += brightness * cytoplasm * (0.3 + 0.7 * perinuclear)
    membrane = np.exp(-(((r_cell - 1) * CELL_RADIUS / 1.2) ** 2))
    golgi_angle = rng.uniform(0, 2 * np.pi)
    gy, gx = cy + 1.3 * nuc_r * math.sin(golgi_angle), cx + 1.3 * nuc_r * math.cos(golgi_angle)
    golgi = np.exp(-((yy - gy) ** 2 + (xx - gx) ** 2) / (2 * 2.0**2))
    maps["agp"][window] += brightness * (0.6 * membrane + 0.15 * cytoplasm + 0.5 * golgi)
    for _ in range(rng.integers(1, 4)):
        ny, nx = cy + rng.normal(0, 0.3 * nuc_b), cx + rng.normal(0, 0.3 * nuc_b)
        maps["nucleoli"][window] += 0.6 * brightness * np.exp(-((yy - ny) ** 2 + (xx - nx) ** 2) / (2 * 1.2**2))


def _ellipse_radius(dy: np.ndarray, dx: np.ndarray, cos: float, sin: float, a: float, b: float) -> np.ndarray:
    """Normalised elliptical radius: 1 on the ellipse with semi-axes ``a`` (along angle) and ``b``."""
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    return np.sqrt((u / a) ** 2 + (v / b) ** 2)


def _soft_inside(radius: np.ndarray, scale: float) -> np.ndarray:
    """About 1 inside, 0 outside, with a one-pixel-wide edge (``scale`` converts normalised radius to pixels)."""
    return 1.0 / (1.0 + np.exp(np.clip((radius - 1.0) * scale * 2.0, -30, 30)))


def _unit(values: np.ndarray) -> np.ndarray:
    spread = values.max() - values.min()
    return (values - values.min()) / spread if spread > 0 else np.zeros_like(values)


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path
