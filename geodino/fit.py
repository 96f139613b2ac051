"""``dinoscope canopy fit``: train a canopy-height head on (image, lidar CHM) chips, validate, save the model.

    dinoscope canopy fit recipes/tiny/canopy_fit.yaml                 # synthetic forests, random tiny ViT, CPU
    dinoscope canopy fit recipes/geo/canopy_fit_vitl14.yaml data.pairs='[[rgb.tif,chm.tif]]'

Chips come from :func:`geodino.chips.make_chip_dataset` with its spatial-block train/validation split. With a
frozen backbone the features of every chip are computed once and memory-mapped from ``RUN/cache`` (float16), so
each epoch only runs the head and memory stays flat however many chips there are; a later fit with the same
backbone, layers, chips and normalisation reuses the cache. :func:`core.train.supervised.train_supervised` trains
the head and validates each epoch (JSONL log ``RUN/metrics.jsonl``); the epoch with the lowest validation MAE is
kept. The run writes ``RUN/model.safetensors``
(+ sidecar), ``RUN/metrics.json`` (MAE, RMSE, R², bias on the validation split, and the same for predicting the
training mean everywhere), ``RUN/pred_vs_ref.png`` and ``RUN/loss_curve.png``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from core.config.loader import to_yaml
from core.distributed.device import resolve_device
from core.errors import DinoscopeError
from core.io import atomic_path, write_json
from core.lock import OutputLock
from core.models.vit import VisionTransformer
from core.train.run_info import write_run_info
from core.train.supervised import SupervisedConfig, train_supervised
from core.weights.load import load_backbone
from core.weights.meta import WeightMeta
from geodino.config import CanopyFitRecipe
from geodino.evaluate import HIST_BIN_M, HIST_MAX_M
from geodino.fit_checks import check_fit_pairs, check_previous_fit, fit_input_rule
from geodino.fit_data import Batch, FeatureCache, LiveChips, chip_splits, file_id, training_pairs
from geodino.hrch_checkpoints import public_checkpoint
from geodino.inputs import training_record
from geodino.metrics import RegressionAccumulator
from geodino.model import CanopyModel, backbone_head_model, random_backbone, save_canopy_model
from geodino.outputs import check_output_path
from geodino.plots import density_scatter

log = logging.getLogger(__name__)


def fit_canopy(
    recipe: CanopyFitRecipe,
    run_dir: str | Path,
    *,
    overwrite: bool = False,
    recipe_path: str | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Run a ``canopy_fit`` recipe into ``run_dir``; returns what was written to ``metrics.json``.

    Nothing is written before the device, the backbone and the listed (image, CHM) pairs are checked. Then the run
    directory is locked for the whole fit (a second fit into it fails at once, naming the first), a finished fit
    made with another recipe is refused unless ``overwrite`` (:func:`geodino.fit_checks.check_previous_fit`), and
    ``config.yaml`` and ``run_info.json`` are written.

    Example::

        from core.config import load_recipe
        from geodino import CanopyFitRecipe, fit_canopy
        recipe = load_recipe(CanopyFitRecipe, "recipes/tiny/canopy_fit.yaml", ["optim.epochs=5"])
        result = fit_canopy(recipe, "runs/canopy_fit")
        result["val"]["mae"], result["baseline_train_mean"]["mae"]   # held-out metres vs predicting the mean
    """
    run_dir = check_output_path(run_dir, is_dir=True, field="output_dir")
    torch.manual_seed(recipe.train.seed)
    device = resolve_device(recipe.train.device, field="train.device")
    bands = [int(b) if str(b).isdigit() else b for b in recipe.data.bands] or None
    backbone, meta, backbone_id = _backbone(recipe)
    check_fit_pairs(recipe, bands, meta.in_chans)
    with OutputLock(run_dir, what="run directory", is_dir=True):
        check_previous_fit(run_dir, recipe, overwrite)
        with atomic_path(run_dir / "config.yaml") as tmp:
            tmp.write_text(to_yaml(recipe))
        write_run_info(run_dir, recipe_path, list(overrides))
        return _fit(recipe, run_dir, device, bands, (backbone, meta, backbone_id))


def _fit(
    recipe: CanopyFitRecipe,
    run_dir: Path,
    device: torch.device,
    bands: list[int | str] | None,
    loaded: tuple[VisionTransformer, WeightMeta, dict[str, Any]],
) -> dict[str, Any]:
    backbone, meta, backbone_id = loaded
    pairs = training_pairs(recipe, run_dir)
    rule = fit_input_rule(recipe, [image for image, _ in pairs], bands)
    chips = chip_splits(recipe, pairs, bands, meta, convert=rule)
    record = training_record(
        chips["train"].images, normalise=recipe.data.normalise, dtype_max=recipe.data.dtype_max, rule=rule
    )
    if chips["train"].images[0].count != meta.in_chans:
        raise DinoscopeError(
            f"the backbone takes {meta.in_chans} channels but {chips['train'].images[0].count} "
            f"bands are selected ({chips['train'].channel_names})",
            path=pairs[0][0],
            field="data.bands",
            fix="select matching bands, or adapt the backbone with backbone.overrides.in_chans=N",
        )
    layers = _layers(recipe, meta)
    model = backbone_head_model(
        backbone,
        meta,
        recipe.head.type,
        head_kwargs(recipe, meta.embed_dim, len(layers)),
        layers=layers,
        feature_norm=recipe.backbone.feature_norm,
        normaliser=chips["train"].normaliser,
        band_names=chips["train"].channel_names,
        metadata={
            "gsd_m": float(chips["train"].images[0].res[0]),
            "crs": str(chips["train"].images[0].crs),
            "trained_on": [[str(a), str(b)] for a, b in pairs],
            "backbone": backbone_id,
            "chip_size": recipe.data.chip_size,
            "input": record.to_dict(),
        },
    ).to(device)
    frozen = recipe.backbone.frozen
    model.net.backbone.requires_grad_(not frozen)
    if frozen and recipe.backbone.cache_features:
        key = {
            "backbone": backbone_id,
            "layers": layers,
            "feature_norm": recipe.backbone.feature_norm,
            "pairs": [[file_id(a), file_id(b)] for a, b in pairs],
            "resampling": recipe.data.resampling,
            "input_rule": rule.to_dict() if rule is not None else None,
        }
        sources = {
            s: FeatureCache(
                run_dir / "cache" / s,
                chips[s],
                model,
                key,
                recipe.optim.batch_size,
                show_progress=recipe.train.progress,
            )
            for s in chips
        }
    else:
        sources = {s: LiveChips(chips[s], recipe.train.num_workers) for s in chips}
    train_mean = sources["train"].target_mean()
    if recipe.head.mode == "regression":
        torch.nn.init.constant_(model.net.head.conv.bias, train_mean)
    best_epoch = _train(model, sources, recipe, device, run_dir)
    final, hist = evaluate_source(model, sources["val"], recipe.optim.loss, device, train_mean=train_mean)
    for chip_set in chips.values():
        chip_set.close()
    model.metadata["val_metrics"] = final["val"]
    # A channel-adapted backbone differs from its file, so it is always embedded.
    by_reference = recipe.backbone.weights and not recipe.backbone.embed and "in_chans" not in recipe.backbone.overrides
    backbone_ref = recipe.backbone.weights if by_reference else None
    model_path = save_canopy_model(model.cpu(), run_dir / "model.safetensors", backbone_path=backbone_ref)
    edges = np.arange(0.0, HIST_MAX_M + HIST_BIN_M / 2, HIST_BIN_M)
    plots = {
        "pred_vs_ref": density_scatter(hist, edges, run_dir / "pred_vs_ref.png", metrics=final["val"]).name,
        "loss_curve": "loss_curve.png",
    }  # drawn by the trainer
    result = {
        **final,
        "train_mean_height_m": train_mean,
        "best_epoch": best_epoch,
        "epochs": recipe.optim.epochs,
        "n_chips": {s: len(c) for s, c in chips.items()},
        "backbone": backbone_id,
        "frozen": frozen,
        "head": {"type": recipe.head.type, "mode": recipe.head.mode},
        "model": model_path.name,
        "plots": plots,
        "units": "m",
        "split": "spatial blocks (geodino.chips)",
    }
    write_json(run_dir / "metrics.json", result)
    log.info(
        "val MAE %.3f m RMSE %.3f m R2 %.3f bias %+.3f m (train-mean baseline MAE %.3f m) -> %s",
        final["val"]["mae"],
        final["val"]["rmse"],
        final["val"]["r2"],
        final["val"]["bias"],
        final["baseline_train_mean"]["mae"],
        model_path,
    )
    return result


# -- model ----------------------------------------------------------------------------------------------------------
def _layers(recipe: CanopyFitRecipe, meta: WeightMeta) -> list[int]:
    """The recipe's blocks; by default the last ``n_layers``, or for a public HRCH backbone the 4 blocks its own
    decoder reads (:data:`geodino.hrch_checkpoints.PUBLIC_HRCH`)."""
    depth = int(meta.model_kwargs["depth"])
    hrch = public_checkpoint(meta.embed_dim, depth) if meta.source_format == "hrch" else None
    if hrch is not None and not recipe.backbone.layers and recipe.backbone.n_layers == len(hrch.out_indices):
        log.info("HRCH %s backbone: using its decoder's blocks %s", hrch.size, list(hrch.out_indices))
        return list(hrch.out_indices)
    layers = list(recipe.backbone.layers) or list(range(depth - recipe.backbone.n_layers, depth))
    if min(layers) < 0 or max(layers) >= depth or layers != sorted(set(layers)):
        raise DinoscopeError(
            f"backbone layers {layers} must be increasing block indices in [0, {depth})",
            field="backbone.layers",
            fix=f"the backbone has {depth} blocks; e.g. layers: {list(range(max(0, depth - 4), depth))}",
        )
    return layers


def _backbone(recipe: CanopyFitRecipe) -> tuple[VisionTransformer, WeightMeta, dict[str, Any]]:
    cfg = recipe.backbone
    if cfg.weights:
        backbone, meta = load_backbone(cfg.weights, **dict(cfg.overrides))
        path = Path(cfg.weights)
        stat = path.stat()
        ident = {
            "weights": str(path.resolve()),
            "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "arch": meta.arch,
            "source_format": meta.source_format,
        }
        return backbone.eval(), meta, ident
    backbone, meta = random_backbone(cfg.arch, cfg.patch_size, recipe.data.chip_size, dict(cfg.overrides))
    ident = {
        "weights": None,
        "random_init": cfg.arch,
        "patch_size": cfg.patch_size,
        "seed": recipe.train.seed,
        "overrides": dict(cfg.overrides),
    }
    return backbone, meta, ident


def head_kwargs(recipe: CanopyFitRecipe, embed_dim: int, n_layers: int) -> dict[str, Any]:
    """Constructor keywords of the recipe's head (see :data:`geodino.model.HEADS`)."""
    h = recipe.head
    common = {
        "embed_dim": embed_dim,
        "n_bins": h.n_bins,
        "min_height": h.min_height,
        "max_height": h.max_height,
        "bin_rule": h.bin_rule,
        "eps": h.eps,
    }
    if h.type == "dpt":
        return {**common, "channels": h.dpt_channels}
    return {**common, "n_layers": n_layers, "use_cls_token": h.use_cls_token, "mode": h.mode, "upsample": h.upsample}


# -- training -----------------------------------------------------------------------------------------------------
def forward_batch(model: CanopyModel, batch: Batch, device: torch.device) -> dict[str, Tensor]:
    """Model outputs ``[B, S, S]`` for a batch of cached features or of images."""
    if "features" not in batch:
        return model(batch["image"].to(device))
    features = [(p.to(device), c.to(device)) for p, c in batch["features"]]
    size = batch["target"].shape[-1]
    out = model.net.head(features, batch["padded"])
    return {k: v[:, :size, :size] for k, v in out.items()}


def masked_loss(pred: Tensor, target: Tensor, valid: Tensor, name: str = "l1") -> Tensor:
    """Mean ``l1`` / ``mse`` / ``huber`` (delta 1 m) error over valid pixels."""
    if name == "l1":
        err = (pred - target).abs()
    elif name == "mse":
        err = (pred - target) ** 2
    else:
        err = torch.nn.functional.huber_loss(pred, target, reduction="none", delta=1.0)
    valid = valid.to(err.dtype)
    return (err * valid).sum() / valid.sum().clamp_min(1.0)


def _train(
    model: CanopyModel, sources: dict[str, Any], recipe: CanopyFitRecipe, device: torch.device, run_dir: Path
) -> int:
    """AdamW with warm-up and cosine decay (core.train.supervised), logged to ``RUN/metrics.jsonl`` and drawn in
    ``RUN/loss_curve.png``; keeps the epoch of lowest validation MAE and returns it."""
    o, frozen = recipe.optim, recipe.backbone.frozen
    trainable = model.net.head if frozen else model.net
    model.eval()  # the trainer switches only `trainable` to train mode: a frozen backbone stays in eval mode

    def groups(_: torch.nn.Module, lr: float) -> list[dict[str, Any]]:
        head = [{"params": list(model.net.head.parameters()), "lr": lr}]
        return (
            head
            if frozen
            else [*head, {"params": list(model.net.backbone.parameters()), "lr": lr * recipe.backbone.lr_mult}]
        )

    def loss(_: torch.nn.Module, batch: Batch) -> tuple[Tensor, float] | None:
        if not batch["valid"].any():
            return None
        out = forward_batch(model, batch, device)
        return masked_loss(out["height"], batch["target"], batch["valid"], o.loss), int(batch["valid"].sum())

    def val_metrics(_: torch.nn.Module, source: Any) -> dict[str, float]:
        val = evaluate_source(model, source, o.loss, device, batch_size=o.batch_size)[0]["val"]
        return {k: val[k] for k in ("loss", "mae", "rmse", "r2", "bias")}

    cfg = SupervisedConfig(
        lrs=(o.lr,),
        epochs=o.epochs,
        batch_size=o.batch_size,
        weight_decay=o.weight_decay,
        optimizer="adamw",
        schedule="cosine",
        warmup_epochs=o.warmup_epochs,
        select="mae",
        mode="min",
        seed=recipe.train.seed,
    )
    result = train_supervised(
        lambda: trainable,
        sources["train"],
        loss,
        cfg,
        val=sources["val"],
        metric_fn=val_metrics,
        param_groups=groups,
        device=device,
        log_path=run_dir / "metrics.jsonl",
        plot_path=run_dir / "loss_curve.png",
        plot_ylabel=f"{o.loss} loss" + (" (m²)" if o.loss == "mse" else " (m)"),
        show_progress=recipe.train.progress,
    )
    return result.best_epoch


def evaluate_source(
    model: CanopyModel,
    source: Any,
    loss_name: str,
    device: torch.device,
    *,
    train_mean: float | None = None,
    batch_size: int = 16,
) -> tuple[dict[str, Any], np.ndarray]:
    """Validation metrics (heights clamped at 0 m, as predicted), the loss, a (ref, pred) 2-D histogram and, with
    ``train_mean``, the metrics of predicting that constant everywhere."""
    model.eval()
    metrics, baseline = RegressionAccumulator(), RegressionAccumulator()
    edges = np.arange(0.0, HIST_MAX_M + HIST_BIN_M / 2, HIST_BIN_M)
    hist = np.zeros((len(edges) - 1, len(edges) - 1), np.int64)
    loss_sum, pixels = 0.0, 0
    with torch.inference_mode():
        for batch in source.batches(batch_size):
            pred = forward_batch(model, batch, device)["height"].float().cpu().clamp_min(0.0)
            target, valid = batch["target"], batch["valid"]
            n = int(valid.sum())
            loss_sum += float(masked_loss(pred, target, valid, loss_name)) * n
            pixels += n
            p, t, v = pred.numpy(), target.numpy(), valid.numpy()
            metrics.update(p, t, v)
            if train_mean is not None:
                baseline.update(np.full_like(t, train_mean), t, v)
            pair = np.clip(np.stack([t[v], p[v]]), edges[0], edges[-1] - 1e-6)
            hist += np.histogram2d(pair[0], pair[1], bins=(edges, edges))[0].astype(np.int64)
    result: dict[str, Any] = {"val": {**metrics.result(), "loss": loss_sum / max(pixels, 1)}}
    if train_mean is not None:
        result["baseline_train_mean"] = baseline.result()
    return result, hist
