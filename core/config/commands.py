"""Schemas of core's sub-commands other than the pretraining recipe: ``export``, ``eval knn|linear``,
``weights inspect|convert``, ``demo``, and the run switches of ``pretrain`` and ``launch``.

Each field is declared once, with its command-line form, help and rules (:func:`core.config.fields.option`);
:mod:`core.cli.adapter` builds the sub-command from it, and the same schema can be given as a YAML file with
``--recipe``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from core.config.fields import option

# Set by `dinoscope launch --allow-recipe-change` for every rank; read by the training session (core.train.session).
ALLOW_CHANGE_ENV = "DINOSCOPE_ALLOW_RECIPE_CHANGE"
WEIGHT_FORMATS = ("dinoscope", "dinov2_hub", "dinov2_train", "cell_dino", "hrch")


@dataclass
class PretrainOptions:
    """Run switches of ``dinoscope pretrain`` (not recipe keys: they say how to run, not what to train)."""

    output_dir: str = option("", help="run directory (default: train.output_dir)")
    no_resume: bool = option(
        False, help="start from scratch; refused when the run directory already holds checkpoints", flags="--no-resume"
    )
    allow_recipe_change: bool = option(
        False, help="resume although the recipe differs from the checkpoint's (recorded in recipe_changes.jsonl)"
    )


@dataclass
class ExportCfg:
    """``dinoscope export RUN_DIR OUT``: a run's teacher backbone as safetensors plus a JSON sidecar."""

    run_dir: str = option("", help="training run directory", positional=True, metavar="RUN_DIR", is_input=True)
    out: str = option("", help="output .safetensors path", positional=True, metavar="OUT", output="file")
    step: int = option(-1, help="checkpoint iteration (-1: the latest)", minimum=-1)


@dataclass
class EvalCfg:
    """``dinoscope eval knn|linear WEIGHTS``: frozen-feature evaluation on a labelled dataset kind."""

    weights: str = option("", help="backbone weights", positional=True, metavar="WEIGHTS", is_input=True)
    kind: str = option("image_folder", help="dataset kind (core.data.DATASET_KINDS or a plugin)")
    train: dict = option({}, help="training-set parameters of the dataset kind, e.g. root=data/train")
    val: dict = option({}, help="held-out-set parameters of the dataset kind, e.g. root=data/val")
    size: int = option(224, help="input side in pixels (a multiple of the patch size)", minimum=14)
    out: str = option("", help="also write the result JSON here", output="file")


@dataclass
class KnnEvalCfg(EvalCfg):
    """Weighted kNN on class tokens (Wu et al. 2018, as in DINO/DINOv2: T = 0.07)."""

    k: list[int] = option([10, 20, 100, 200], help="neighbour counts, comma-separated", comma_list=True, minimum=1)


@dataclass
class LinearEvalCfg(EvalCfg):
    """Linear probes on class token (+ average-pooled patch tokens) with an lr grid (DINOv2 protocol)."""

    n_last_blocks: int = option(1, help="concatenate the class tokens of this many last blocks", minimum=1)
    epochs: int = option(100, help="training epochs of each probe", minimum=1)


@dataclass
class WeightsCfg:
    """``dinoscope weights inspect PATH``: how a checkpoint is read (family, branch, channels, normalisation)."""

    path: str = option("", help="checkpoint (.pth, .safetensors)", positional=True, metavar="PATH", is_input=True)
    format: str = option(
        "", help="checkpoint family (detected from the keys by default)", choices=("", *WEIGHT_FORMATS)
    )
    branch: str = option("teacher", help="which network of a training checkpoint", choices=("teacher", "student"))
    num_heads: int = option(0, help="attention heads, for widths that are not a multiple of 64", minimum=0)
    in_chans: int = option(
        0, help="adapt the patch embedding to this many input channels (0: keep)", minimum=0, maximum=4096
    )
    channel_strategy: str = option(
        "repeat", help="how new input channels are initialised", choices=("repeat", "mean", "zero")
    )
    channel_names: list[str] = option([], help="channel names, comma-separated", comma_list=True)
    mean: list[float] = option([], help="per-channel means for inputs in [0, 1], comma-separated", comma_list=True)
    std: list[float] = option([], help="per-channel stds, comma-separated", comma_list=True, above=0.0)
    json: bool = option(False, help="machine-readable output (inspect)")


@dataclass
class WeightsConvertCfg(WeightsCfg):
    """``dinoscope weights convert PATH OUT``: rewrite weights in dinoscope's export format."""

    out: str = option("", help="output .safetensors path", positional=True, metavar="OUT", output="file")


@dataclass
class DemoCfg:
    """``dinoscope demo``: the main job on embedded data, end to end."""

    out: str = option("demo_out", help="output directory")
    quick: bool = option(False, help="fewer iterations (smoke test)")
    threads: int = option(
        1,
        help="torch CPU threads for the steps (0: torch's default); the demo's models are so small that one thread "
        "is about as fast as two, and a busy machine slows several threads down many times over",
        minimum=0,
        maximum=1024,
    )
    steps: str = option("", help="step list (default: the packaged demo_steps.yaml)", cli=False)


@dataclass
class LaunchOptions:
    """Run switches of ``dinoscope launch``; the resources themselves are ``launch.<key>`` flags and overrides."""

    resources: str = option("", help="launch resources file (recipes/launch/*.yaml)", is_input=True)
    rdzv_endpoint: str = option("", help="sets --master-addr and --master-port at once", metavar="HOST:PORT")
    output_dir: str = option("", help="run directory (default: the recipe's train.output_dir)")
    allow_recipe_change: bool = option(
        False, help="resume although the recipe differs from the checkpoint's (recorded in recipe_changes.jsonl)"
    )
    dry_run: bool = option(False, help="print the job (sbatch script, submitit parameters, commands); start nothing")
    worker: bool = option(False, help=argparse.SUPPRESS)  # what each launched rank runs
