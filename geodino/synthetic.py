"""Deterministic synthetic forest scenes: an RGB orthophoto and its canopy-height model on one projected grid.

The scenes exist so that training, prediction and evaluation can be tested end to end without real lidar. Height
must be learnable from appearance, as in real imagery, so the generator models the cues a canopy-height network
uses:

* crown size follows height through a power-law allometry ``radius = a * height ** b`` (the form fitted
  worldwide by Jucker et al. 2017, "Allometric equations for integrating remote sensing imagery into forest
  monitoring programmes", Global Change Biology 23:177-190; our coefficients are illustrative);
* heights follow a right-skewed gamma distribution clipped to 2-40 m;
* crowns are paraboloids shaded by a Lambertian sun model, with per-tree colour and leaf texture;
* every object casts a shadow whose length is ``height / tan(sun elevation)`` (height-field ray casting);
* ground texture, canopy gaps, and nodata regions (RGB 255 in one corner, CHM NaN along one edge, as where an
  image or a lidar swath ends).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import CRSError

from core.errors import DinoscopeError
from core.io import atomic_path
from core.memory import check_fits_in_memory
from geodino.raster import tile_size_for

RGB_NODATA = 255
_ALLOMETRY_A, _ALLOMETRY_B = 0.6, 0.7  # radius [m] = a * height[m] ** b
_CROWN_DEPTH = 0.45  # fraction of tree height from crown top to crown edge


@dataclasses.dataclass
class Trees:
    """Tree positions in pixels (``col``, ``row``), ``height`` and crown ``radius`` in metres."""

    col: np.ndarray
    row: np.ndarray
    height: np.ndarray
    radius: np.ndarray


@dataclasses.dataclass
class ForestScene:
    """An in-memory scene: ``rgb`` uint8 ``3 x H x W`` (255 = nodata), ``chm`` float32 metres (NaN = nodata)."""

    rgb: np.ndarray
    chm: np.ndarray
    shadow: np.ndarray
    trees: Trees
    transform: Affine
    crs: str


def allometric_radius(height: np.ndarray) -> np.ndarray:
    """Crown radius in metres for a tree height in metres (power law, Jucker et al. 2017)."""
    return _ALLOMETRY_A * np.power(np.maximum(height, 0.0), _ALLOMETRY_B)


def sample_trees(rng: np.random.Generator, size: int, res: float) -> Trees:
    """Random stems at 120-300 per hectare outside a few circular canopy gaps."""
    side_m = size * res
    area_ha = side_m**2 / 10_000
    n_trees = rng.poisson(rng.uniform(120, 300) * area_ha)
    col = rng.uniform(0, size, n_trees)
    row = rng.uniform(0, size, n_trees)
    n_gaps = 1 + rng.poisson(3 * area_ha)
    gap_col, gap_row = rng.uniform(0, size, n_gaps), rng.uniform(0, size, n_gaps)
    gap_radius_px = rng.uniform(8, 25, n_gaps) / res
    in_gap = ((col[:, None] - gap_col) ** 2 + (row[:, None] - gap_row) ** 2 < gap_radius_px**2).any(axis=1)
    col, row = col[~in_gap], row[~in_gap]
    height = np.clip(rng.gamma(3.0, 6.0, col.size), 2.0, 40.0)
    radius = allometric_radius(height) * rng.lognormal(0.0, 0.12, col.size)
    return Trees(col=col, row=row, height=height, radius=radius)


def canopy_height(trees: Trees, size: int, res: float) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise paraboloid crowns: CHM float32 ``H x W`` in metres and the id of the top tree (-1 = ground)."""
    chm = np.zeros((size, size), np.float32)
    top = np.full((size, size), -1, np.int32)
    for i in np.argsort(trees.height):
        r_px = trees.radius[i] / res
        r0, r1 = max(0, int(trees.row[i] - r_px)), min(size, int(trees.row[i] + r_px) + 2)
        c0, c1 = max(0, int(trees.col[i] - r_px)), min(size, int(trees.col[i] + r_px) + 2)
        if r1 <= r0 or c1 <= c0:
            continue
        rows = np.arange(r0, r1)[:, None] + 0.5 - trees.row[i]
        cols = np.arange(c0, c1)[None, :] + 0.5 - trees.col[i]
        d2 = (rows**2 + cols**2) / r_px**2
        crown = trees.height[i] * (1.0 - _CROWN_DEPTH * d2)
        higher = (d2 < 1.0) & (crown > chm[r0:r1, c0:c1])
        chm[r0:r1, c0:c1][higher] = crown[higher]
        top[r0:r1, c0:c1][higher] = i
    return chm, top


def cast_shadows(chm: np.ndarray, res: float, sun_elevation: float = 55.0, sun_azimuth: float = 135.0) -> np.ndarray:
    """Cast shadows on a height field: bool ``H x W``, True where the sun is hidden.

    A pixel is shadowed when, marching from it towards the sun, some surface rises above the ray climbing at
    ``tan(elevation)``; a tree of height ``h`` on flat ground thus shades ``h / tan(elevation)`` metres of ground.
    Angles in degrees; azimuth clockwise from north (rows grow southwards, columns eastwards).
    """
    height, width = chm.shape
    d_col, d_row = math.sin(math.radians(sun_azimuth)), -math.cos(math.radians(sun_azimuth))
    rise_per_px = res * math.tan(math.radians(sun_elevation))
    surface = np.nan_to_num(chm.astype(np.float32), nan=0.0)
    steps = int(math.ceil(float(surface.max(initial=0.0)) / rise_per_px)) + 1
    shadow = np.zeros(chm.shape, bool)
    seen = set()
    for k in range(1, steps + 1):
        dc, dr = round(k * d_col), round(k * d_row)
        if (dc, dr) in seen or abs(dc) >= width or abs(dr) >= height:
            continue
        seen.add((dc, dr))
        # ahead[p] = surface[p + (dr, dc)]: the height met k steps towards the sun.
        dst_r, src_r = _shift_slices(dr, height)
        dst_c, src_c = _shift_slices(dc, width)
        ray = surface[dst_r, dst_c] + math.hypot(dc, dr) * rise_per_px
        shadow[dst_r, dst_c] |= surface[src_r, src_c] > ray + 0.05
    return shadow


def render_rgb(
    chm: np.ndarray,
    top: np.ndarray,
    shadow: np.ndarray,
    rng: np.random.Generator,
    res: float,
    sun_elevation: float,
    sun_azimuth: float,
) -> np.ndarray:
    """Colour a scene: textured ground, sun-shaded crowns with per-tree tint, darkened shadows. uint8 3 x H x W."""
    f32 = np.float32
    ground_tone = 1 + 0.18 * _smooth_noise(rng, chm.shape, 12.0 / res) + 0.06 * _smooth_noise(rng, chm.shape, 1)
    tints = np.array([52.0, 88.0, 40.0], f32)[:, None] * rng.uniform(0.75, 1.25, (3, int(top.max()) + 2)).astype(f32)
    grad_r, grad_c = np.gradient(chm.astype(f32), f32(res))
    el, az = math.radians(sun_elevation), math.radians(sun_azimuth)
    sun = [f32(math.sin(az) * math.cos(el)), f32(-math.cos(az) * math.cos(el)), f32(math.sin(el))]
    lambert = (sun[2] - grad_c * sun[0] - grad_r * sun[1]) / np.sqrt(grad_c**2 + grad_r**2 + 1)
    leaves = 1 + 0.12 * _smooth_noise(rng, chm.shape, 0.6 / res)
    crown_light = (0.45 + 0.9 * np.clip(lambert, 0, 1)) * leaves
    is_crown = top >= 0
    darkening = np.where(shadow, f32(0.42), f32(1.0))
    rgb = np.empty((3, *chm.shape), np.uint8)
    for band, ground_colour in enumerate((118.0, 108.0, 78.0)):
        # Column 0 of tints is the ground placeholder (top == -1 maps to it); real trees start at column 1.
        crown = tints[band][top + 1] * crown_light
        value = np.where(is_crown, crown, f32(ground_colour) * ground_tone) * darkening
        value += rng.normal(0.0, 2.0, chm.shape).astype(f32)
        rgb[band] = np.clip(value, 0, RGB_NODATA - 1)
    return rgb


def forest_scene(
    size: int = 512,
    seed: int = 0,
    res: float = 0.5,
    crs: str = "EPSG:32617",
    nodata_fraction: float = 0.05,
    sun_elevation: float = 55.0,
    sun_azimuth: float = 135.0,
    origin: tuple[float, float] = (400_000.0, 3_290_000.0),
) -> ForestScene:
    """Generate a scene in memory (see the module docstring); deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    trees = sample_trees(rng, size, res)
    chm, top = canopy_height(trees, size, res)
    shadow = cast_shadows(chm, res, sun_elevation, sun_azimuth)
    rgb = render_rgb(chm, top, shadow, rng, res, sun_elevation, sun_azimuth)
    if nodata_fraction > 0:
        rows, cols = np.mgrid[0:size, 0:size]
        leg = size * math.sqrt(2.0 * nodata_fraction)  # a corner triangle of area leg^2 / 2
        rgb[:, (size - 1 - cols) + rows < leg] = RGB_NODATA
        chm[:, : int(round(size * nodata_fraction))] = np.nan
    transform = Affine(res, 0.0, origin[0], 0.0, -res, origin[1])
    return ForestScene(rgb=rgb, chm=chm, shadow=shadow, trees=trees, transform=transform, crs=crs)


# Peak working set of forest_scene per pixel: about a dozen float64 planes (crowns, shadows, texture, RGB).
_SCENE_BYTES_PER_PIXEL = 100


def _check_scene(size: int, res: float, crs: str) -> None:
    """Refuse sizes, pixel sizes and CRSs that cannot make a scene, before any work or file."""
    if size < 32:
        raise DinoscopeError(f"size {size} is too small for a forest scene", field="size", fix="use at least 32 pixels")
    if not res > 0:
        raise DinoscopeError(f"pixel size {res} m is not positive", field="res", fix="e.g. 0.5 (metres)")
    try:
        parsed = CRS.from_user_input(crs)
    except CRSError as err:
        raise DinoscopeError(f"unknown CRS {crs!r} ({err})", field="crs", fix="e.g. EPSG:32617 (a UTM zone)") from None
    if parsed.is_geographic:
        raise DinoscopeError(
            f"{crs} is geographic (degrees)", field="crs", fix="use a projected CRS in metres, e.g. a UTM zone"
        )
    check_fits_in_memory(
        size * size * _SCENE_BYTES_PER_PIXEL,
        what=f"a {size} x {size} synthetic scene",
        field="size",
        fix="use a smaller --size and more --scenes",
    )


def make_forest(
    out_dir: str | os.PathLike,
    size: int = 512,
    seed: int = 0,
    res: float = 0.5,
    crs: str = "EPSG:32617",
    nodata_fraction: float = 0.05,
    *,
    sun_elevation: float = 55.0,
    sun_azimuth: float = 135.0,
) -> tuple[Path, Path]:
    """Write a synthetic forest as a uint8 RGB GeoTIFF and a float32 CHM GeoTIFF (metres) on the same grid.

    Both files are tiled and DEFLATE-compressed. The RGB uses 255 as nodata, the CHM NaN.

    Returns:
        ``(rgb_path, chm_path)`` inside ``out_dir``.

    Example::

        from geodino import make_forest
        rgb, chm = make_forest("data/forest", size=512, seed=3)   # 0.5 m pixels, EPSG:32617
    """
    _check_scene(size, res, crs)
    scene = forest_scene(size, seed, res, crs, nodata_fraction, sun_elevation, sun_azimuth)
    out_dir = Path(out_dir)
    rgb_path = out_dir / f"forest_seed{seed}_rgb.tif"
    chm_path = out_dir / f"forest_seed{seed}_chm.tif"
    tile = tile_size_for(size, size)
    common = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "crs": crs,
        "transform": scene.transform,
        "tiled": True,
        "blockxsize": tile,
        "blockysize": tile,
        "compress": "deflate",
    }
    with (
        atomic_path(rgb_path) as tmp,
        rasterio.open(
            tmp, "w", count=3, dtype="uint8", nodata=RGB_NODATA, photometric="RGB", predictor=2, **common
        ) as dst,
    ):
        dst.write(scene.rgb)
        dst.descriptions = ("red", "green", "blue")
        dst.update_tags(sun_elevation=sun_elevation, sun_azimuth=sun_azimuth, seed=seed, synthetic="dinoscope")
    with (
        atomic_path(chm_path) as tmp,
        rasterio.open(tmp, "w", count=1, dtype="float32", nodata=np.nan, predictor=3, **common) as dst,
    ):
        dst.write(scene.chm, 1)
        dst.descriptions = ("canopy_height",)
        dst.update_tags(units="m", seed=seed, synthetic="dinoscope")
    return rgb_path, chm_path


def _shift_slices(offset: int, length: int) -> tuple[slice, slice]:
    """Destination and source slices so that ``dst[i] = src[i + offset]`` within bounds."""
    if offset >= 0:
        return slice(0, length - offset), slice(offset, length)
    return slice(-offset, length), slice(0, length + offset)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Unit-variance Gaussian-filtered white noise (filtered in the Fourier domain, so no scipy needed)."""
    white = rng.standard_normal(shape)
    k_row = np.fft.fftfreq(shape[0])[:, None]
    k_col = np.fft.rfftfreq(shape[1])[None, :]
    kernel = np.exp(-2.0 * (math.pi * sigma_px) ** 2 * (k_row**2 + k_col**2))
    smooth = np.fft.irfft2(np.fft.rfft2(white) * kernel, s=shape)
    return (smooth / max(float(smooth.std()), 1e-12)).astype(np.float32)
