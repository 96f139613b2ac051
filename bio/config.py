"""Recipe schemas for the cell commands: ``kind: cells_embed`` and ``kind: cells_profile``.

Schemas only: the services that run them are wired in ``bio.kinds`` (entry points ``dinoscope.recipes``).
``dinoscope cells embed`` builds the same schema from its flags, so a recipe and a command line describe a run
identically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from core.config.fields import input_path
from core.errors import DinoscopeError


@dataclass
class EmbedDataCfg:
    sources: list[str] = input_path(default_factory=list)  # OME-Zarr plate roots and/or LoadData CSVs
    channels: list[str] = field(default_factory=list)  # channels to embed, in order; empty = all
    centroids: str = "detect"  # detect | table | labels
    nuclei_table: str = input_path()  # CellProfiler nuclei CSV for centroids: table
    label_channel: str = ""  # instance-mask channel (or NGFF labels/<name>) for centroids: labels
    detect_channel: str = "DNA"  # nuclear stain for centroids: detect
    illumination: str = input_path()  # .npz flat-fields per channel (bio.preprocess.save_illumination)


@dataclass
class EmbedModelCfg:
    weights: str = input_path()  # backbone file (safetensors + sidecar, DINOv2 / Cell-DINO .pth)
    weights_channels: list[str] = field(default_factory=list)  # model input names when the file has none
    normalisation: str = "auto"  # auto | zscore | meta | none
    n_last_blocks: int = 1
    avgpool: bool = False
    input_size: int = 0  # resize crops to this side before the model; 0 = crop size
    batch_size: int = 256
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CUDA autocast)


@dataclass
class EmbedCropsCfg:
    size: int = 64
    edge: str = "pad"  # pad (flagged in cells.parquet) | skip


@dataclass
class EmbedOutputCfg:
    dir: str = "runs/cells_embed"
    dtype: str = "float32"  # float32 | float16
    chunk_rows: int = 0  # rows per zarr chunk; 0 = about 8 MiB per chunk
    head: str = input_path()  # phenotype head from `dinoscope cells fit-head` (an input): per-cell predictions
    resume: bool = True


@dataclass
class CellsEmbedRecipe:
    data: EmbedDataCfg = field(default_factory=EmbedDataCfg)
    model: EmbedModelCfg = field(default_factory=EmbedModelCfg)
    crops: EmbedCropsCfg = field(default_factory=EmbedCropsCfg)
    output: EmbedOutputCfg = field(default_factory=EmbedOutputCfg)

    def validate(self, path: str | os.PathLike | None = None) -> None:
        choices = {
            "data.centroids": (self.data.centroids, ("detect", "table", "labels")),
            "model.normalisation": (self.model.normalisation, ("auto", "zscore", "meta", "none")),
            "model.precision": (self.model.precision, ("fp32", "bf16", "fp16")),
            "crops.edge": (self.crops.edge, ("pad", "skip")),
            "output.dtype": (self.output.dtype, ("float32", "float16")),
        }
        _check_choices(choices, path)
        if not self.data.sources:
            raise DinoscopeError(
                "no input plates",
                path=path,
                field="data.sources",
                fix="list OME-Zarr plates or LoadData CSVs under data.sources",
            )
        if not self.model.weights:
            raise DinoscopeError(
                "no backbone weights",
                path=path,
                field="model.weights",
                fix="set model.weights (e.g. the output of `dinoscope export`)",
            )
        needs = {
            "table": ("data.nuclei_table", self.data.nuclei_table),
            "labels": ("data.label_channel", self.data.label_channel),
        }.get(self.data.centroids)
        if needs and not needs[1]:
            raise DinoscopeError(f"data.centroids {self.data.centroids!r} needs {needs[0]}", path=path, field=needs[0])
        for key, value in (
            ("crops.size", self.crops.size),
            ("model.batch_size", self.model.batch_size),
            ("model.n_last_blocks", self.model.n_last_blocks),
        ):
            if value < 1:
                raise DinoscopeError(f"{key} must be at least 1, got {value}", path=path, field=key)


@dataclass
class CellsProfileRecipe:
    run: str = input_path()  # embedding run directory (embeddings.zarr + cells.parquet)
    platemap: str = input_path()  # CSV: plate, well, treatment, role (+ annotations such as moa)
    output_dir: str = "runs/cells_profile"  # profiles.parquet and eval/ are written here
    aggregate: str = "median"  # median | mean
    normalise: str = "mad_robustize"  # mad_robustize | standardize | spherize | none
    normalise_by: str = "plate"  # plate | all
    level: str = "well"  # well | treatment
    drop_edge_cells: bool = False
    control_column: str = "role"
    control_value: str = "negative_control"
    treatment_column: str = "treatment"
    evaluate: bool = True  # also run `dinoscope cells evaluate` into output_dir/eval
    annotation_column: str = "moa"
    batch_column: str = "plate"
    null_size: int = 10000
    knn_k: int = 1
    seed: int = 0

    def validate(self, path: str | os.PathLike | None = None) -> None:
        _check_choices(
            {
                "aggregate": (self.aggregate, ("median", "mean")),
                "normalise": (self.normalise, ("mad_robustize", "standardize", "spherize", "none")),
                "normalise_by": (self.normalise_by, ("plate", "all")),
                "level": (self.level, ("well", "treatment")),
            },
            path,
        )
        for key in ("run", "platemap"):
            if not getattr(self, key):
                raise DinoscopeError(
                    f"{key} is not set",
                    path=path,
                    field=key,
                    fix="give the embedding run directory and the plate-map CSV",
                )


def _check_choices(choices: dict[str, tuple[str, tuple[str, ...]]], path: str | os.PathLike | None) -> None:
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise DinoscopeError(f"{key} is {value!r}", path=path, field=key, fix=f"use one of {valid}")
