"""Schemas of the cell commands: ``kind: cells_embed`` and ``kind: cells_profile`` recipes, and the
``dinoscope cells synth|fit-head|profile|evaluate`` sub-commands.

Schemas only (dataclasses, field metadata, validation). Each field is declared once with its flag, help and rules
(:func:`core.config.fields.option`); :mod:`bio.cli` builds the sub-commands from them and :mod:`bio.services` runs
them, so a recipe file and the equivalent command line describe a run identically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from core.config.fields import option
from core.errors import DinoscopeError

NORMALISATIONS = ("mad_robustize", "standardize", "spherize", "none")
# TIFF file names -> plate, well, site: BR00117010_A01_s1, plate1-B12-2, plate1_C03_field4 (bio.fields_files)
DEFAULT_NAME_PATTERN = r"(?P<plate>.+?)[_-](?P<well>[A-Za-z]{1,2}\d{1,3})(?:[_-](?:s|site|f|field)?(?P<site>\d+))?"


@dataclass
class EmbedDataCfg:
    """Where the cells come from."""

    sources: list[str] = option(
        [],
        help="OME-Zarr plates (.zarr), LoadData CSVs, multi-channel (OME-)TIFF files, folders of them, or image-list "
        "CSVs (file, plate, well, site)",
        positional=True,
        metavar="SOURCE",
        is_input=True,
    )
    channels: list[str] = option(
        [], help="channels to embed, comma-separated, in order (default: all)", comma_list=True
    )
    centroids: str = option("detect", help="where nuclei come from", choices=("detect", "table", "labels"))
    nuclei_table: str = option(
        "", help="CellProfiler nuclei CSV (Nuclei_Location_Center_X/Y) for --centroids table", is_input=True
    )
    label_channel: str = option("", help="instance-mask channel or NGFF labels name for --centroids labels")
    detect_channel: str = option("DNA", help="nuclear stain for --centroids detect")
    illumination: str = option(
        "", help=".npz flat-fields per channel to divide by (bio.preprocess.save_illumination)", is_input=True
    )
    channel_map: list[str] = option(
        [],
        help="rename source channels, comma-separated OLD=NEW (LoadData FileName_OrigDNA is DNA without it)",
        comma_list=True,
    )
    name_pattern: str = option(
        DEFAULT_NAME_PATTERN,
        help="regular expression with groups plate, well (or row, column) and site, matched against TIFF file "
        "names without their .ome.tif/.tif suffix",
    )


@dataclass
class EmbedModelCfg:
    """The backbone and how crops are fed to it."""

    weights: str = option(
        "", help="backbone weights (.safetensors + .json from `dinoscope export`, or .pth)", is_input=True
    )
    weights_channels: list[str] = option(
        [], help="names of a fixed-channel model's inputs in order, when the weights carry none", comma_list=True
    )
    normalisation: str = option(
        "auto",
        help="per-crop z-score (Cell-DINO), the weights' mean/std, or none",
        choices=("auto", "zscore", "meta", "none"),
    )
    n_last_blocks: int = option(1, help="class tokens of this many last blocks", minimum=1)
    avgpool: bool = option(False, help="append the mean patch token")
    input_size: int = option(0, help="resize crops to this side before the model (0: the crop size)", minimum=0)
    batch_size: int = option(256, help="crops per forward pass", minimum=1)
    device: str = option("auto", help="cpu, cuda, cuda:N or auto")
    precision: str = option("fp32", help="CUDA autocast precision", choices=("fp32", "bf16", "fp16"))


@dataclass
class EmbedCropsCfg:
    """Single-cell crops around each nucleus."""

    size: int = option(64, help="crop side in pixels", flags="--crop-size", minimum=8)
    edge: str = option("pad", help="crops crossing the border: pad (flagged) or skip", choices=("pad", "skip"))


@dataclass
class EmbedQcCfg:
    """When a cell is flagged by quality control (bio.qc); flags are stored, `cells profile --qc` drops them."""

    min_focus_ratio: float = option(
        0.5, help="flag 'blur' below this fraction of the plate's median focus score", above=0.0, below=1.0
    )
    max_saturated: float = option(
        0.01, help="flag 'saturated' above this share of crop pixels at the saturation level", minimum=0.0, maximum=1.0
    )
    debris_fold: float = option(
        4.0, help="flag 'debris' when the nucleus area is this many times off the plate's median", above=1.0
    )


@dataclass
class EmbedOutputCfg:
    """The embedding run directory."""

    dir: str = option("runs/cells_embed", help="run directory (embeddings.zarr + cells.parquet)", flags="--out")
    dtype: str = option(
        "float32",
        help="stored embedding type",
        choices=("float32", "float16"),
        switches=(("--float16", "float16"),),
    )
    chunk_rows: int = option(0, help="rows per zarr chunk (0: about 8 MiB)", minimum=0)
    head: str = option(
        "", help="phenotype head from `dinoscope cells fit-head`: adds per-cell predictions", is_input=True
    )
    format: str = option(
        "zarr", help="anndata also writes RUN/cells.h5ad (obs: cells, X: embeddings)", choices=("zarr", "anndata")
    )
    resume: bool = option(True, help="continue a previous run in --out (--no-resume discards it and starts over)")
    overwrite: bool = option(False, help="replace a finished run in --out that was made with other settings")


@dataclass
class CellsEmbedRecipe:
    """``dinoscope cells embed`` / ``kind: cells_embed``: per-cell embeddings of plates.

    Example::

        from core.config import load_recipe
        from bio import CellsEmbedRecipe
        recipe = load_recipe(CellsEmbedRecipe, "recipes/tiny/cells_embed.yaml", ["model.n_last_blocks=4"])
    """

    data: EmbedDataCfg = field(default_factory=EmbedDataCfg)
    model: EmbedModelCfg = field(default_factory=EmbedModelCfg)
    crops: EmbedCropsCfg = field(default_factory=EmbedCropsCfg)
    qc: EmbedQcCfg = field(default_factory=EmbedQcCfg)
    output: EmbedOutputCfg = field(default_factory=EmbedOutputCfg)

    def validate(self, path: str | os.PathLike | None = None) -> None:
        """Plates and weights are required; each centroid source needs its input."""
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
        try:
            channel_map_of(self.data.channel_map)
        except DinoscopeError as err:
            raise DinoscopeError(err.message, path=path, field=err.field, fix=err.fix) from None


@dataclass
class ControlCfg:
    """Plate-map columns that name treatments and negative controls (JUMP's ``Metadata_`` names work as they are)."""

    control_column: str = option("role", help="plate-map column marking controls, e.g. Metadata_control_type")
    control_value: str = option("negative_control", help="value of negative-control wells, e.g. negcon")
    treatment_column: str = option("treatment", help="plate-map column naming treatments, e.g. Metadata_pert_iname")


@dataclass
class ProfileSettings(ControlCfg):
    """How cell embeddings become normalised profiles (pycytominer conventions)."""

    aggregate: str = option("median", help="cells -> well statistic", choices=("median", "mean"))
    normalise: str = option("mad_robustize", help="pycytominer method fitted on controls", choices=NORMALISATIONS)
    normalise_by: str = option(
        "plate", help="fit the normalisation per plate or once on all controls", choices=("plate", "all")
    )
    level: str = option(
        "well", help="write well profiles or treatment consensus profiles", choices=("well", "treatment")
    )
    drop_edge_cells: bool = option(False, help="skip cells flagged 'edge'")
    qc: bool = option(False, help="drop cells with any QC flag (blur, saturated, debris, edge) before aggregating")
    allow_missing_wells: bool = option(
        False, help="drop wells missing from the plate map (and map wells without cells) instead of failing"
    )
    feature_prefix: str = option(
        "emb_", help="feature column prefix; Cells_DINO_ lets pycytominer's features='infer' find them"
    )


@dataclass
class EvaluateSettings:
    """How profiles are scored (copairs mAP, not-same-batch kNN, plate separation); the column settings default to
    those `cells profile` stored in the profiles."""

    control_column: str = option("", help="column marking controls (default: as given to `cells profile`, else role)")
    control_value: str = option("", help="value of control wells (default: as given to `cells profile`)")
    treatment_column: str = option("", help="column naming treatments (default: as given to `cells profile`)")
    min_replicates: int = option(3, help="treatments with fewer replicate wells are flagged, never hits", minimum=2)
    batch_column: str = option("plate", help="column whose values define batches for not-same-batch kNN")
    annotation_column: str = option("moa", help="annotation for consistency mAP (if present)")
    null_size: int = option(10000, help="permutations for mAP p-values", minimum=10)
    threshold: float = option(0.05, help="q-value threshold for 'retrieved'", minimum=0.0, maximum=1.0)
    knn_k: int = option(1, help="neighbours for kNN (1 = CHAMMI 1-NN)", minimum=1)
    batch_size: int = option(20000, help="pairs per copairs similarity batch", minimum=1)
    seed: int = option(0, help="random seed of the permutations")


def _require(obj: object, keys: tuple[str, ...], path: str | os.PathLike | None, fix: str) -> None:
    for key in keys:
        if not getattr(obj, key):
            raise DinoscopeError(f"{key} is not set", path=path, field=key, fix=fix)


@dataclass
class CellsProfileCfg(ProfileSettings):
    """``dinoscope cells profile RUN --platemap CSV --out FILE``: well profiles into one Parquet file."""

    run: str = option(
        "",
        help="embedding run directory (embeddings.zarr + cells.parquet)",
        positional=True,
        metavar="RUN",
        is_input=True,
    )
    platemap: str = option("", help="CSV with plate, well, treatment, role (+ e.g. moa)", is_input=True)
    out: str = option("", help="output profiles .parquet", output="file")

    def validate(self, path: str | os.PathLike | None = None) -> None:
        """The run, the plate map and the output file are required."""
        _require(self, ("run", "platemap", "out"), path, "dinoscope cells profile RUN --platemap CSV --out FILE")


@dataclass
class CellsEvaluateCfg(EvaluateSettings):
    """``dinoscope cells evaluate PROFILES --out DIR``: metrics, figures and an HTML report."""

    profiles: str = option(
        "",
        help="profiles .parquet from `dinoscope cells profile`",
        positional=True,
        metavar="PROFILES",
        is_input=True,
    )
    out: str = option("", help="output directory", output="dir")

    def validate(self, path: str | os.PathLike | None = None) -> None:
        """The profiles and the output directory are required."""
        _require(self, ("profiles", "out"), path, "dinoscope cells evaluate PROFILES --out DIR")


@dataclass
class CellsProfileRecipe(ProfileSettings, EvaluateSettings):
    """``kind: cells_profile``: profiles into ``output_dir/profiles.parquet``, then (``evaluate``) metrics into
    ``output_dir/eval``.

    Example::

        from core.config import load_recipe
        from bio import CellsProfileRecipe
        recipe = load_recipe(CellsProfileRecipe, None, ["run=runs/embed", "platemap=platemap.csv"])
    """

    run: str = option("", help="embedding run directory (embeddings.zarr + cells.parquet)", is_input=True)
    platemap: str = option("", help="CSV: plate, well, treatment, role (+ annotations such as moa)", is_input=True)
    output_dir: str = option("runs/cells_profile", help="profiles.parquet and eval/ are written here")
    evaluate: bool = option(True, help="also score the profiles into output_dir/eval")

    def validate(self, path: str | os.PathLike | None = None) -> None:
        """The embedding run and the plate map are required."""
        _require(self, ("run", "platemap"), path, "give the embedding run directory and the plate-map CSV")


@dataclass
class CellsSynthCfg:
    """``dinoscope cells synth OUT``: a deterministic synthetic cell-painting screen."""

    out: str = option("", help="output directory", positional=True, metavar="OUT", output="dir")
    seed: int = option(0, help="random seed")
    plates: int = option(2, help="number of plates", minimum=1)
    rows: int = option(4, help="well rows per plate", minimum=1, maximum=32)
    cols: int = option(6, help="well columns per plate", minimum=1, maximum=48)
    fields: int = option(2, help="fields of view per well", minimum=1)
    size: int = option(128, help="field side in pixels", minimum=32)
    ngff: str = option("0.5", help="OME-NGFF version", choices=("0.4", "0.5"))
    blurred_fields: int = option(0, help="out-of-focus fields planted per plate (QC tests)", minimum=0)
    saturated_wells: int = option(0, help="over-exposed wells planted per plate (QC tests)", minimum=0)


@dataclass
class CellsFitHeadCfg:
    """``dinoscope cells fit-head RUN --platemap CSV --out DIR``: a phenotype classifier on cell embeddings."""

    run: str = option(
        "",
        help="embedding run directory from `dinoscope cells embed`",
        positional=True,
        metavar="RUN",
        is_input=True,
    )
    platemap: str = option("", help="CSV with plate, well, treatment, role (+ e.g. moa)", is_input=True)
    label: str = option("treatment", help="plate-map column to predict, e.g. moa or Metadata_pert_iname")
    out: str = option("", help="output directory for the head", output="dir")
    holdout_fraction: float = option(0.25, help="share of each label's wells held out", minimum=0.0, maximum=0.9)
    max_cells_per_well: int = option(500, help="cells sampled per well", minimum=1)
    epochs: int = option(100, help="training epochs", minimum=1)
    lr: float = option(1e-3, help="AdamW learning rate", minimum=0.0)
    weight_decay: float = option(1e-4, help="AdamW weight decay", minimum=0.0)
    drop_edge_cells: bool = option(False, help="skip cells flagged 'edge'")
    allow_missing_wells: bool = option(
        False, help="skip wells of the run missing from the plate map instead of failing"
    )
    seed: int = option(0, help="random seed of the well split and sampling")

    def validate(self, path: str | os.PathLike | None = None) -> None:
        """The run, the plate map and the output directory are required."""
        _require(self, ("run", "platemap", "out"), path, "dinoscope cells fit-head RUN --platemap CSV --out DIR")


def channel_map_of(items: list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """``["OrigDNA=DNA", ...]`` -> ``{"OrigDNA": "DNA", ...}``; a malformed item is a DinoscopeError."""
    mapping: dict[str, str] = {}
    for item in items or ():
        old, sep, new = str(item).partition("=")
        if not sep or not old.strip() or not new.strip():
            raise DinoscopeError(
                f"channel map item {item!r} is not OLD=NEW",
                field="data.channel_map",
                fix="write it as --channel-map OrigDNA=DNA,OrigER=ER",
            )
        mapping[old.strip()] = new.strip()
    return mapping
