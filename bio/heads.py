"""Phenotype heads: a linear classifier on frozen cell embeddings, trained on one plate-map label.

``dinoscope cells fit-head RUN --platemap platemap.csv --label moa --out HEAD`` trains
:class:`PhenotypeClassifier` (standardised embeddings -> :class:`core.models.LinearHead`, the DINOv2 / Cell-DINO
linear probe on frozen features) on the cells of an embedding run, each labelled with its well's ``treatment`` or
``moa``. Wells, not cells, are split into train and held-out sets (stratified by label), because cells of one well
share its plate position and staining and would leak across a cell-level split. Held-out macro-F1 (Cell-DINO and
CHAMMI report macro-F1; ``mean_per_class_multiclass_f1`` in facebookresearch/dinov2 ``eval/metrics.py``) goes to
``HEAD/metrics.json``. The head is saved as ``HEAD/head.safetensors`` + ``HEAD/head.json`` carrying the channel
names, normalisation, feature layout and weights checksum of the embeddings it was trained on, so
``dinoscope cells embed --head HEAD`` refuses embeddings made differently.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import zarr
from safetensors.torch import load_file, save_file
from sklearn.metrics import accuracy_score, f1_score
from torch import Tensor, nn

from bio.backbone import file_sha256
from bio.profiles import meta_column, normalise_well_names, open_run
from bio.profiles_platemap import PLATE, WELL, read_platemap
from core.errors import DinoscopeError
from core.io import atomic_path, write_json
from core.models import LinearHead
from core.train.supervised import SupervisedConfig, train_supervised

log = logging.getLogger(__name__)

HEAD_FORMAT = "dinoscope.cells.head/1"
_READ_BLOCK_ROWS = 8192


class PhenotypeClassifier(nn.Module):
    """``embeddings [N, in_dim] -> logits [N, n_classes]``: standardise with the training statistics, then linear."""

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        self.head = LinearHead(in_dim, n_classes)

    def forward(self, embeddings: Tensor) -> Tensor:
        """``[N, in_dim]`` embeddings -> ``[N, n_classes]`` logits (softmax them for probabilities)."""
        return self.head((embeddings - self.feature_mean) / self.feature_std)


def predict_proba(classifier: PhenotypeClassifier, embeddings: np.ndarray) -> np.ndarray:
    """Class probabilities ``[N, K]`` (float32) for float embeddings ``[N, D]``."""
    with torch.inference_mode():
        logits = classifier(torch.from_numpy(np.asarray(embeddings, dtype=np.float32)))
        return nn.functional.softmax(logits, dim=-1).numpy()


def split_wells(labels: pd.Series, holdout_fraction: float, seed: int) -> np.ndarray:
    """Held-out mask over wells, stratified: each label with >= 2 wells keeps at least one well on each side."""
    rng = np.random.default_rng(seed)
    held_out = np.zeros(len(labels), bool)
    for _, positions in sorted(
        pd.Series(np.arange(len(labels)), index=labels.to_numpy()).groupby(level=0).indices.items()
    ):
        if len(positions) < 2:
            continue
        n_out = min(len(positions) - 1, max(1, int(round(holdout_fraction * len(positions)))))
        held_out[rng.permutation(positions)[:n_out]] = True
    return held_out


def fit_head(
    run_dir: str | os.PathLike,
    platemap: str | os.PathLike,
    *,
    label: str = "treatment",
    holdout_fraction: float = 0.25,
    max_cells_per_well: int = 500,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 1024,
    drop_edge_cells: bool = False,
    seed: int = 0,
    allow_missing_wells: bool = False,
) -> tuple[PhenotypeClassifier, dict[str, Any], dict[str, Any]]:
    """Train a phenotype head on an embedding run; returns ``(classifier, head metadata, held-out metrics)``.

    Cells get the ``label`` of their well in ``platemap`` (a column such as ``moa`` or JUMP's
    ``Metadata_pert_iname``, with or without the ``Metadata_`` prefix); wells with an empty label are skipped, and
    wells the plate map does not list are an error unless ``allow_missing_wells``. At most
    ``max_cells_per_well`` cells per well are used (seeded sample), which bounds memory on large screens. Training
    is full AdamW on a class-balanced cross-entropy, so rare labels count as much as common ones for macro-F1.

    Example::

        from bio import fit_head
        from bio.heads import save_head
        classifier, meta, metrics = fit_head("runs/embed", "platemap.csv", label="moa")
        print(metrics["macro_f1"], metrics["chance_macro_f1"])   # held-out wells
        save_head(classifier, meta, metrics, "runs/moa_head")
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise DinoscopeError(f"holdout_fraction must lie in (0, 1), got {holdout_fraction}", field="holdout_fraction")
    run = open_run(run_dir)
    attrs = zarr.open_group(run.root / "embeddings.zarr", mode="r").attrs.asdict()
    plate_map = read_platemap(platemap, required=(label,)).rename(columns={PLATE: "plate", WELL: "well"})
    column = meta_column(label)
    cells = pd.read_parquet(run.cells_path, columns=["plate", "well", "edge"])
    cells["well"] = normalise_well_names(cells["well"])
    keys = [k for k in ("plate", "well") if k in plate_map.columns]
    _check_wells_mapped(cells, plate_map, keys, platemap, allow_missing_wells)
    labelled = plate_map.loc[plate_map[column].fillna("").str.strip() != "", keys + [column]]
    cells = cells.reset_index(names="row").merge(labelled, on=keys, how="inner")
    if drop_edge_cells:
        cells = cells.loc[~cells["edge"].astype(bool)]
    if cells.empty:
        raise DinoscopeError(
            f"no cell of the run has a {label!r} in the plate map",
            path=platemap,
            field=label,
            fix="check plate names and wells in the plate map",
        )
    wells = cells.groupby(["plate", "well"], sort=True)[column].first().reset_index()
    classes = sorted(wells[column].unique())
    if len(classes) < 2:
        raise DinoscopeError(
            f"the label {label!r} has a single value {classes}",
            field=label,
            fix="choose a label with at least two classes",
        )
    wells["held_out"] = split_wells(wells[column], holdout_fraction, seed)
    cells = cells.merge(wells[["plate", "well", "held_out"]], on=["plate", "well"])
    rng = np.random.default_rng(seed)
    chosen = np.sort(
        np.concatenate(
            [
                rng.permutation(group.to_numpy())[:max_cells_per_well]
                for _, group in cells.groupby(["plate", "well"], sort=True)["row"]
            ]
        )
    )
    cells = cells.set_index("row").loc[chosen]
    x = torch.from_numpy(_read_rows(run.embeddings, chosen))
    y = torch.from_numpy(cells[column].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64, copy=True))
    test = torch.from_numpy(cells["held_out"].to_numpy(bool, copy=True))
    classifier = _train(
        x[~test],
        y[~test],
        len(classes),
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        seed=seed,
    )
    probs = predict_proba(classifier, x[test].numpy())
    metrics = _metrics(probs, y[test].numpy(), cells.loc[test.numpy(), ["plate", "well"]], classes, label)
    metrics.update(
        n_train_cells=int((~test).sum()),
        n_train_wells=int((~wells["held_out"]).sum()),
        train_wells=_well_list(wells.loc[~wells["held_out"]]),
        held_out_wells=_well_list(wells.loc[wells["held_out"]]),
        holdout_fraction=holdout_fraction,
        seed=seed,
        run=str(run.root),
        platemap=str(platemap),
    )
    meta = {
        "format": HEAD_FORMAT,
        "label": label,
        "classes": classes,
        "in_dim": run.dim,
        **{k: attrs.get(k) for k in ("channel_names", "channel_mode", "normalisation", "features")},
        "weights_sha256": (attrs.get("weights") or {}).get("sha256"),
        "training": {
            "epochs": epochs,
            "lr": lr,
            "weight_decay": weight_decay,
            "batch_size": batch_size,
            "max_cells_per_well": max_cells_per_well,
            "drop_edge_cells": drop_edge_cells,
        },
        "macro_f1": metrics["macro_f1"],
    }
    log.info(
        "%s head: held-out macro-F1 %.3f on %d cells of %d wells (%d classes)",
        label,
        metrics["macro_f1"],
        metrics["n_test_cells"],
        metrics["n_test_wells"],
        len(classes),
    )
    return classifier, meta, metrics


def _check_wells_mapped(
    cells: pd.DataFrame, plate_map: pd.DataFrame, keys: list[str], path: Any, allow_missing_wells: bool
) -> None:
    """Wells of the run the plate map does not list: an error naming them, unless ``allow_missing_wells``."""
    run_wells = cells[["plate", "well"]].drop_duplicates()
    listed = run_wells.merge(plate_map[keys].drop_duplicates(), on=keys, how="left", indicator=True)
    absent = listed.loc[listed["_merge"] == "left_only", ["plate", "well"]]
    if absent.empty:
        return
    names = [f"{p}/{w}" for p, w in absent.itertuples(index=False)]
    message = f"{len(names)} well(s) of the run are not in the plate map: {', '.join(names[:5])}"
    if not allow_missing_wells:
        raise DinoscopeError(
            message + (f" and {len(names) - 5} more" if len(names) > 5 else ""),
            path=path,
            field="plate/well",
            fix="complete the plate map (or check its plate names), or pass --allow-missing-wells to skip them",
        )
    log.warning("%s: skipped (--allow-missing-wells)", message)


def _read_rows(array: Any, rows: np.ndarray) -> np.ndarray:
    """Sorted row indices of a row-chunked ``[N, D]`` array, read block by block (never the whole array)."""
    out = np.empty((len(rows), array.shape[1]), np.float32)
    filled = 0
    for start in range(0, int(rows[-1]) + 1 if len(rows) else 0, _READ_BLOCK_ROWS):
        wanted = rows[(rows >= start) & (rows < start + _READ_BLOCK_ROWS)]
        if len(wanted):
            block = np.asarray(array[int(wanted[0]) : int(wanted[-1]) + 1], dtype=np.float32)
            out[filled : filled + len(wanted)] = block[wanted - wanted[0]]
            filled += len(wanted)
    return out


def _train(
    x: Tensor, y: Tensor, n_classes: int, *, epochs: int, lr: float, weight_decay: float, batch_size: int, seed: int
) -> PhenotypeClassifier:
    """AdamW at a constant lr for ``epochs`` over seeded shuffles; the last epoch is kept (no validation split: the
    held-out wells are scored once, afterwards)."""
    counts = torch.bincount(y, minlength=n_classes).float()
    weights = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp(min=1)), torch.zeros(()))

    def make_classifier() -> PhenotypeClassifier:
        classifier = PhenotypeClassifier(x.shape[1], n_classes)
        classifier.feature_mean.copy_(x.mean(0))
        classifier.feature_std.copy_(x.std(0, unbiased=False) + 1e-6)
        return classifier

    def loss(classifier: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        features, labels = batch
        return nn.functional.cross_entropy(classifier(features), labels, weight=weights)

    cfg = SupervisedConfig(
        lrs=(lr,),
        epochs=epochs,
        batch_size=batch_size,
        weight_decay=weight_decay,
        optimizer="adamw",
        schedule="constant",
        seed=seed,
    )
    result = train_supervised(make_classifier, (x, y), loss, cfg, desc="phenotype head", show_progress=False)
    return result.head  # type: ignore[return-value]


def _metrics(
    probs: np.ndarray, truth: np.ndarray, wells: pd.DataFrame, classes: list[str], label: str
) -> dict[str, Any]:
    present = sorted(set(truth.tolist()))
    pred = probs.argmax(axis=1)
    per_class = f1_score(truth, pred, labels=present, average=None, zero_division=0)
    well_probs = pd.DataFrame(probs, index=pd.MultiIndex.from_frame(wells)).groupby(level=[0, 1]).mean()
    well_truth = pd.Series(truth, index=pd.MultiIndex.from_frame(wells)).groupby(level=[0, 1]).first()
    well_pred = well_probs.to_numpy().argmax(axis=1)
    return {
        "label": label,
        "classes": classes,
        "n_test_cells": int(len(truth)),
        "n_test_wells": int(len(well_truth)),
        "macro_f1": float(np.mean(per_class)),
        "accuracy": float(accuracy_score(truth, pred)),
        "chance_macro_f1": 1.0 / len(present),
        "per_class_f1": {classes[c]: float(f) for c, f in zip(present, per_class, strict=True)},
        "well_macro_f1": float(
            f1_score(
                well_truth.loc[well_probs.index].to_numpy(), well_pred, labels=present, average="macro", zero_division=0
            )
        ),
    }


def _well_list(wells: pd.DataFrame) -> list[str]:
    return [f"{p}/{w}" for p, w in zip(wells["plate"], wells["well"], strict=True)]


def save_head(
    classifier: PhenotypeClassifier, meta: dict[str, Any], metrics: dict[str, Any], out_dir: str | os.PathLike
) -> Path:
    """Write ``head.safetensors``, ``head.json`` and ``metrics.json`` into ``out_dir`` (each atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "head.safetensors") as tmp:
        save_file(
            {k: v.detach().contiguous() for k, v in classifier.state_dict().items()},
            str(tmp),
            metadata={"dinoscope_head": json.dumps(meta, default=str)},
        )
    write_json(out / "head.json", meta)
    write_json(out / "metrics.json", metrics)
    return out / "head.safetensors"


def load_head(path: str | os.PathLike) -> tuple[PhenotypeClassifier, dict[str, Any]]:
    """Read a head directory (or its ``head.safetensors``); the metadata gains ``sha256`` and ``path``."""
    path = Path(path)
    weights = path / "head.safetensors" if path.is_dir() else path
    sidecar = weights.with_suffix(".json")
    if not weights.exists() or not sidecar.exists():
        raise DinoscopeError(
            "phenotype head not found (head.safetensors + head.json)",
            path=path,
            fix="pass the --out directory of `dinoscope cells fit-head`",
        )
    meta = json.loads(sidecar.read_text())
    if meta.get("format") != HEAD_FORMAT:
        raise DinoscopeError(
            f"not a phenotype head (format {meta.get('format')!r})",
            path=sidecar,
            field="format",
            fix="pass a head written by `dinoscope cells fit-head`",
        )
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise DinoscopeError(
            f"unreadable head weights ({err})", path=weights, fix="re-run `dinoscope cells fit-head`"
        ) from None
    classifier = PhenotypeClassifier(int(meta["in_dim"]), len(meta["classes"]))
    classifier.load_state_dict(state, strict=True)
    return classifier.eval(), {**meta, "sha256": file_sha256(weights), "path": str(weights)}


def check_compatible(head_meta: dict[str, Any], description: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse to apply a head to embeddings made with other channels, normalisation, features or weights."""
    wanted = {
        "channel_names": head_meta.get("channel_names"),
        "normalisation": (head_meta.get("normalisation") or {}).get("method"),
        "features": head_meta.get("features"),
        "weights_sha256": head_meta.get("weights_sha256"),
    }
    have = {
        "channel_names": description["channel_names"],
        "normalisation": description["normalisation"]["method"],
        "features": description["features"],
        "weights_sha256": description["weights"]["sha256"],
    }
    if wanted["weights_sha256"] is None or have["weights_sha256"] is None:
        wanted.pop("weights_sha256"), have.pop("weights_sha256")
    differ = [k for k in wanted if wanted[k] != have[k]]
    if differ:
        detail = "; ".join(f"{k}: head {wanted[k]} vs now {have[k]}" for k in differ)
        raise DinoscopeError(
            f"the head was trained on different embeddings ({detail})",
            path=path,
            field=differ[0],
            fix="embed with the settings the head was trained on, or fit a new head on this run",
        )
