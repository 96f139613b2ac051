"""Recipe schemas for ``canopy_fit`` and ``canopy_predict``.

    dinoscope canopy fit recipes/tiny/canopy_fit.yaml                  # synthetic forests, CPU, about a minute
    dinoscope canopy fit recipes/geo/canopy_fit_vitl14.yaml data.pairs='[[img.tif,chm.tif]]'
    dinoscope canopy predict --model runs/tiny/canopy_fit/model.safetensors scene.tif --out chm.tif

Schemas only (dataclasses, field metadata and validation); ``geodino.kinds`` wires each schema to the service that
runs it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from core.config.fields import input_path, option
from core.errors import DinoscopeError


@dataclass
class SyntheticCfg:
    scenes: int = 0  # > 0: write this many synthetic forests (geodino.synthetic) into RUN/synthetic and fit on them
    size: int = 256
    res: float = 0.5
    seed: int = 0  # scene i uses seed + i


@dataclass
class FitDataCfg:
    pairs: list[list[str]] = input_path(default_factory=list)  # [[image, chm], ...]; globs and directories allowed
    images: list[str] = input_path(default_factory=list)  # files, directories or globs, all covered by `chm`
    chm: str = input_path()  # one CHM (file, VRT or glob of tiles, mosaicked) for every image of `images`
    bands: list[str] = field(default_factory=list)  # names or 1-based indices; empty = every band
    synthetic: SyntheticCfg = field(default_factory=SyntheticCfg)
    chip_size: int = 64
    stride: int = 0  # 0 = chip_size; smaller strides only add chips when block_size > chip_size
    block_size: int = 0  # spatial split block edge in pixels; 0 = 4 * chip_size
    val_fraction: float = 0.2
    split_seed: int = 0
    max_nodata_fraction: float = 0.5
    resampling: str = "bilinear"  # CHM -> image grid: bilinear | average | max | nearest ...
    normalise: str = "weights_meta"  # weights_meta (the backbone's mean/std) | percentiles (2-98 of the images)
    dtype_max: float = 255.0  # raw value mapped to 1.0 for weights_meta (255 for uint8)
    input_range: str = ""  # "LOW,HIGH" or "auto": raw range mapped onto 0..dtype_max, stored with the model
    input_scale: float = 0.0  # > 0: raw x input_scale instead (stored with the model)


@dataclass
class FitBackboneCfg:
    weights: str = input_path()  # any load_backbone source; "" = randomly initialised `arch` (tests, baselines)
    arch: str = "vit_test"  # only when weights is ""
    patch_size: int = 8  # only when weights is ""
    overrides: dict[str, Any] = field(default_factory=dict)  # load_backbone keywords, e.g. {num_heads: 4}
    frozen: bool = True
    layers: list[int] = field(default_factory=list)  # block indices; empty = the last n_layers
    n_layers: int = 4
    feature_norm: bool = False
    embed: bool = True  # store the backbone in the model file; False references `weights` by path
    lr_mult: float = 0.1  # backbone learning rate / head learning rate when not frozen
    cache_features: bool = True  # frozen only: compute features once into RUN/cache (memory-mapped)


@dataclass
class FitHeadCfg:
    type: str = "linear"  # linear | dpt
    mode: str = "bins"  # bins | regression (linear only)
    n_bins: int = 256
    min_height: float = 0.0
    max_height: float = 60.0
    bin_rule: str = "softmax"  # softmax | relu_eps (HRCH's rule; trains a linear head far slower, see fit.py)
    eps: float = 0.1
    use_cls_token: bool = True
    upsample: int = 4
    dpt_channels: int = 64


@dataclass
class FitOptimCfg:
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    loss: str = "l1"  # l1 | mse | huber (on metres, valid pixels only)


@dataclass
class FitTrainCfg:
    output_dir: str = "runs/canopy_fit"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 0
    progress: bool = True


@dataclass
class CanopyFitRecipe:
    """``dinoscope canopy fit`` / ``kind: canopy_fit``: a canopy-height head on a frozen backbone.

    Example::

        from core.config import load_recipe
        from geodino import CanopyFitRecipe
        recipe = load_recipe(CanopyFitRecipe, "recipes/tiny/canopy_fit.yaml", ["head.mode=bins"])
    """

    data: FitDataCfg = field(default_factory=FitDataCfg)
    backbone: FitBackboneCfg = field(default_factory=FitBackboneCfg)
    head: FitHeadCfg = field(default_factory=FitHeadCfg)
    optim: FitOptimCfg = field(default_factory=FitOptimCfg)
    train: FitTrainCfg = field(default_factory=FitTrainCfg)

    def validate(self, path: str | os.PathLike | None = None) -> None:
        """Impossible values fail here, before anything runs."""
        _choices(
            path,
            {
                "head.type": (self.head.type, ("linear", "dpt")),
                "head.mode": (self.head.mode, ("bins", "regression")),
                "head.bin_rule": (self.head.bin_rule, ("relu_eps", "softmax")),
                "optim.loss": (self.optim.loss, ("l1", "mse", "huber")),
                "data.normalise": (self.data.normalise, ("weights_meta", "percentiles")),
            },
        )
        if self.head.type == "dpt" and self.head.mode != "bins":
            raise DinoscopeError("the dpt head predicts bins only", path=path, field="head.mode", fix="use mode: bins")
        if self.head.type == "dpt" and len(self.backbone.layers or range(self.backbone.n_layers)) != 4:
            raise DinoscopeError("the dpt head needs exactly 4 backbone layers", path=path, field="backbone.layers")
        if not self.data.pairs and not self.data.images and self.data.synthetic.scenes < 1:
            raise DinoscopeError(
                "no training data: data.pairs and data.images are empty and data.synthetic.scenes is 0",
                path=path,
                field="data.pairs",
                fix="give [[image.tif, chm.tif], ...] pairs, or data.images (files or globs) with one data.chm",
            )
        if bool(self.data.images) != bool(self.data.chm):
            raise DinoscopeError(
                "data.images and data.chm go together" + (" (data.chm is empty)" if self.data.images else ""),
                path=path,
                field="data.chm" if self.data.images else "data.images",
                fix="e.g. data.images='[tiles/*.tif]' data.chm=lidar/chm.vrt",
            )
        _check_rule_fields(path, "data.", self.data.input_range, self.data.input_scale)
        for i, pair in enumerate(self.data.pairs):
            if len(pair) != 2:
                raise DinoscopeError(
                    f"data.pairs[{i}] has {len(pair)} entries",
                    path=path,
                    field="data.pairs",
                    fix="each pair is [image.tif, chm.tif]",
                )
        positive = {
            "data.chip_size": self.data.chip_size,
            "optim.epochs": self.optim.epochs,
            "optim.batch_size": self.optim.batch_size,
            "head.n_bins": self.head.n_bins,
            "backbone.n_layers": self.backbone.n_layers,
        }
        for key, value in positive.items():
            if value < 1:
                raise DinoscopeError(f"{key} must be at least 1, got {value}", path=path, field=key)
        if not self.head.max_height > self.head.min_height >= 0:
            raise DinoscopeError("need max_height > min_height >= 0", path=path, field="head.max_height")


TALLEST_TREE_M = 120.0  # uint16 outputs must represent every real canopy height (tallest known tree: ~116 m)


@dataclass
class CanopyPredictRecipe:
    """``dinoscope canopy predict`` / ``kind: canopy_predict``: seamless tiled prediction into COGs.

    Example::

        from core.config import load_recipe
        from geodino import CanopyPredictRecipe
        recipe = load_recipe(CanopyPredictRecipe, None, ["model=m.safetensors", "inputs=[a.tif]", "out=chm/"])
    """

    model: str = option("", help="model.safetensors from `canopy fit`, or a full HRCH .pth", is_input=True)
    inputs: list[str] = option(
        [], help="input rasters (GeoTIFF, COG, VRT), directories or globs", positional=True, is_input=True
    )
    out: str = option("", help="output .tif (one input) or directory (one COG per input + mosaic.vrt)")
    uncertainty: bool = option(False, help="also write the per-pixel std (<name>_std.tif)")
    tile: int = option(256, help="tile side in pixels", minimum=16)
    overlap: int = option(64, help="overlap between tiles in pixels", minimum=0)
    batch_size: int = option(8, help="tiles per model call", minimum=1)
    dtype: str = option(
        "float32",
        help="float32 metres with NaN nodata, or uint16 (metres x uint16_scale, 65535 nodata)",
        choices=("float32", "uint16"),
    )
    uint16_scale: float = option(100.0, help="uint16 units per metre (100: centimetres)", minimum=0.001)
    bands: list[str] = option([], help="bands to use, 1-based indices or names (default: all)")
    device: str = option("auto", help="auto, cpu, cuda or cuda:N")
    num_workers: int = option(1, help="threads normalising tiles (one more reads)", flags="--workers", minimum=1)
    num_heads: int = option(0, help="attention heads of an HRCH checkpoint that is not a public one", minimum=0)
    hrch_blocks: list[int] = option(
        [],
        help="decoder blocks of an HRCH checkpoint that is not a public one, e.g. 2,5,8,10",
        comma_list=True,
        minimum=0,
    )
    input_range: str = option(
        "", help="LOW,HIGH raw values mapped onto the model's input range (clipped), or auto (2nd-98th percentiles)"
    )
    input_scale: float = option(0.0, help="multiply raw values by this to reach the model's input range", minimum=0)
    mosaic: bool = option(False, help="one COG per mosaic of touching inputs instead of one per input")
    resume: bool = option(True, help="continue a previous interrupted run's partial output")
    overwrite: bool = option(False, help="replace existing outputs that were made with other settings or models")

    def validate(self, path: str | os.PathLike | None = None) -> None:
        """A model, inputs and an output are required; tiles must overlap less than their size; uint16 output must
        hold the tallest trees."""
        for key in ("model", "out"):
            if not getattr(self, key):
                raise DinoscopeError(f"{key} is empty", path=path, field=key)
        if self.overlap >= self.tile:
            raise DinoscopeError(
                f"overlap {self.overlap} is not smaller than tile {self.tile}",
                path=path,
                field="overlap",
                fix="use an overlap of about a quarter of the tile",
            )
        highest = 65534 / self.uint16_scale
        if self.dtype == "uint16" and highest < TALLEST_TREE_M:
            raise DinoscopeError(
                f"uint16 with scale {self.uint16_scale} stores heights only up to {highest:.2f} m",
                path=path,
                field="uint16_scale",
                fix=f"use a scale of at most {65534 / TALLEST_TREE_M:.0f} (100 = centimetres)",
            )
        if not self.inputs:
            raise DinoscopeError("inputs is empty", path=path, field="inputs", fix="list the rasters to predict")
        _check_rule_fields(path, "", self.input_range, self.input_scale)


def _check_rule_fields(path: str | os.PathLike | None, prefix: str, input_range: str, input_scale: float) -> None:
    """``input_range`` is empty, ``auto`` or ``LOW,HIGH`` (LOW < HIGH), and not combined with ``input_scale``."""
    text = input_range.strip().lower()
    numbers = re.fullmatch(r"\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*", text)
    try:
        ok = text in ("", "auto") or (numbers is not None and float(numbers[1]) < float(numbers[2]))
    except ValueError:
        ok = False
    if not ok:
        raise DinoscopeError(
            f"{prefix}input_range is {input_range!r}",
            path=path,
            field=f"{prefix}input_range",
            fix="give LOW,HIGH with LOW < HIGH (e.g. 0,10000) or auto",
        )
    if text and input_scale:
        raise DinoscopeError(
            f"{prefix}input_range and {prefix}input_scale are both set",
            path=path,
            field=f"{prefix}input_scale",
            fix="choose one rule: a raw range mapped onto the model's, or a factor",
        )


def _choices(path: str | os.PathLike | None, checks: dict[str, tuple[str, tuple[str, ...]]]) -> None:
    for key, (value, valid) in checks.items():
        if value not in valid:
            raise DinoscopeError(f"{key} is {value!r}", path=path, field=key, fix=f"use one of {list(valid)}")


@dataclass
class FitOptions:
    """Run switches of ``dinoscope canopy fit``."""

    output_dir: str = option("", help="run directory (default: train.output_dir)")
    overwrite: bool = option(False, help="replace a finished fit in the run directory made with another recipe")


@dataclass
class CanopySynthCfg:
    """``dinoscope canopy synth OUT``: deterministic synthetic forests (RGB GeoTIFF + matching CHM)."""

    out: str = option("", help="output directory", positional=True, metavar="OUT", output="dir")
    scenes: int = option(1, help="number of scenes (seeds seed, seed+1, ...)", minimum=1)
    seed: int = option(0, help="random seed of the first scene")
    size: int = option(512, help="scene side in pixels", minimum=32)
    res: float = option(0.5, help="pixel size in metres", minimum=0.01)
    crs: str = option("EPSG:32617", help="projected CRS")


@dataclass
class CanopyEvaluateCfg:
    """``dinoscope canopy evaluate PRED REF``: a predicted canopy-height raster against a reference CHM."""

    pred: str = option(
        "",
        help="predicted canopy height raster (metres, or with a GDAL scale)",
        positional=True,
        metavar="PRED",
        is_input=True,
    )
    ref: str = option(
        "",
        help="reference canopy height model (e.g. lidar CHM), any CRS",
        positional=True,
        metavar="REF",
        is_input=True,
    )
    out: str = option("", help="output directory", output="dir")
    resampling: str = option(
        "bilinear",
        help="how REF is resampled onto PRED's grid: bilinear (upsampling), average or max (downsampling)",
        choices=("bilinear", "average", "max", "nearest", "cubic", "min", "med", "mode"),
    )
    block: int = option(50, help="block size in pixels for block R2 (HRCH: 50)", minimum=2)
    trim: int = option(3, help="border trimmed before block R2, in pixels (HRCH: 3)", minimum=0)
    ref_scale: float = option(
        0.0, help="metres per REF unit when the file has no scale metadata (0: the file's)", minimum=0.0
    )
    pred_scale: float = option(0.0, help="metres per PRED unit (0: the file's metadata)", minimum=0.0)

    def validate(self, path: str | os.PathLike | None = None) -> None:
        """Both rasters and the output directory must be named."""
        _required(self, path, ("pred", "ref", "out"), "dinoscope canopy evaluate PRED REF --out DIR")


@dataclass
class CanopyZonalCfg:
    """``dinoscope canopy zonal RASTER PLOTS OUTPUT``: per-plot canopy statistics (polygons, or points + buffer)."""

    raster: str = option("", help="canopy height raster", positional=True, metavar="RASTER", is_input=True)
    polygons: str = option(
        "",
        help="plots: polygons or points (GeoPackage, GeoParquet, shapefile, GeoJSON) or a CSV with x/y columns",
        positional=True,
        metavar="PLOTS",
        is_input=True,
    )
    output: str = option(
        "",
        help="output file (.gpkg recommended; .parquet, .geojson or .csv also work)",
        positional=True,
        metavar="OUTPUT",
        output="file",
    )
    cover_threshold: float = option(5.0, help="canopy cover threshold in metres", minimum=0.0)
    band: int = option(1, help="raster band holding heights", minimum=1)
    buffer: float = option(0.0, help="plot radius in metres around point plots (in a local metric CRS)", minimum=0)
    crs: str = option("", help="CRS of a CSV's x/y columns (or of a vector file without one), e.g. EPSG:4326")
    x_column: str = option("", help="CSV column of x / longitude (default: x, lon, longitude, easting...)")
    y_column: str = option("", help="CSV column of y / latitude (default: y, lat, latitude, northing...)")
    prefix: str = option("", help="prefix of the statistics columns, e.g. chm_ (they never replace input columns)")

    def validate(self, path: str | os.PathLike | None = None) -> None:
        """The raster, the plots and the output must be named."""
        _required(self, path, ("raster", "polygons", "output"), "dinoscope canopy zonal RASTER PLOTS OUTPUT")


@dataclass
class CanopyInspectCfg:
    """``dinoscope canopy inspect RASTER [--model M]``: what a raster holds, and how it meets a model's inputs."""

    raster: str = option("", help="raster to inspect", positional=True, metavar="RASTER", is_input=True)
    model: str = option("", help="canopy model (.safetensors from canopy fit, or an HRCH .pth) to compare with")
    bands: list[str] = option([], help="bands to use, 1-based indices or names (default: all but alpha)")
    input_range: str = option("", help="as in canopy predict: LOW,HIGH or auto")
    input_scale: float = option(0.0, help="as in canopy predict: multiply raw values", minimum=0)
    num_heads: int = option(0, help="as in canopy predict, for an HRCH checkpoint that is not a public one", minimum=0)
    hrch_blocks: list[int] = option([], help="as in canopy predict", comma_list=True, minimum=0)
    json: bool = option(False, help="print JSON instead of text")

    def validate(self, path: str | os.PathLike | None = None) -> None:
        """The raster must be named; a rule needs a model to compare with."""
        _required(self, path, ("raster",), "dinoscope canopy inspect RASTER [--model MODEL]")
        _check_rule_fields(path, "", self.input_range, self.input_scale)


def _required(cfg: Any, path: str | os.PathLike | None, keys: tuple[str, ...], usage: str) -> None:
    for key in keys:
        if not getattr(cfg, key):
            raise DinoscopeError(f"{key} is not set", path=path, field=key, fix=usage)
