"""Recipe schemas for ``canopy_fit`` and ``canopy_predict``.

    dinoscope canopy fit recipes/tiny/canopy_fit.yaml                  # synthetic forests, CPU, about a minute
    dinoscope canopy fit recipes/geo/canopy_fit_vitl14.yaml data.pairs='[[img.tif,chm.tif]]'
    dinoscope canopy predict --model runs/tiny/canopy_fit/model.safetensors scene.tif --out chm.tif

Schemas only (dataclasses, field metadata and validation); ``geodino.kinds`` wires each schema to the service that
runs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from core.config.fields import input_path
from core.errors import DinoscopeError


@dataclass
class SyntheticCfg:
    scenes: int = 0  # > 0: write this many synthetic forests (geodino.synthetic) into RUN/synthetic and fit on them
    size: int = 256
    res: float = 0.5
    seed: int = 0  # scene i uses seed + i


@dataclass
class FitDataCfg:
    pairs: list[list[str]] = input_path(default_factory=list)  # [[image.tif, chm.tif], ...]; CHMs on any grid/CRS
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
        if not self.data.pairs and self.data.synthetic.scenes < 1:
            raise DinoscopeError(
                "no training data: data.pairs is empty and data.synthetic.scenes is 0",
                path=path,
                field="data.pairs",
                fix="give [[image.tif, chm.tif], ...] pairs",
            )
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


@dataclass
class CanopyPredictRecipe:
    model: str = input_path()  # model.safetensors from `canopy fit`, or a full HRCH .pth
    inputs: list[str] = input_path(default_factory=list)
    out: str = ""  # a .tif for one input; otherwise a directory (one COG per input + mosaic.vrt)
    uncertainty: bool = False
    tile: int = 256
    overlap: int = 64
    batch_size: int = 8
    dtype: str = "float32"  # float32 (metres, NaN nodata) | uint16 (metres * uint16_scale, 65535 nodata)
    uint16_scale: float = 100.0
    bands: list[str] = field(default_factory=list)
    device: str = "auto"
    num_workers: int = 1
    num_heads: int = 0  # HRCH checkpoints whose width is not a multiple of 64
    resume: bool = True

    def validate(self, path: str | os.PathLike | None = None) -> None:
        _choices(path, {"dtype": (self.dtype, ("float32", "uint16"))})
        for key in ("model", "out"):
            if not getattr(self, key):
                raise DinoscopeError(f"{key} is empty", path=path, field=key)
        if not self.inputs:
            raise DinoscopeError("inputs is empty", path=path, field="inputs", fix="list the rasters to predict")


def _choices(path: str | os.PathLike | None, checks: dict[str, tuple[str, tuple[str, ...]]]) -> None:
    for key, (value, valid) in checks.items():
        if value not in valid:
            raise DinoscopeError(f"{key} is {value!r}", path=path, field=key, fix=f"use one of {list(valid)}")
