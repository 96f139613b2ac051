"""The supervised head trainer (lr grid, early stopping, log, plot, seeding) and the Figure-API-only plotting rule."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from core.errors import DinoscopeError
from core.train.report import write_loss_curve
from core.train.supervised import SupervisedConfig, TensorSource, train_supervised

REPO = Path(__file__).parents[2]
# Library modules that still switch the backend or use pyplot, owned elsewhere; the list may only shrink.
PYPLOT_PENDING: set[str] = set()


def _regression(n: int = 256, seed: int = 0) -> tuple[TensorSource, TensorSource]:
    """y = x @ w + small noise, split 3:1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.01 * torch.randn(n, generator=g)
    cut = 3 * n // 4
    return TensorSource(x[:cut], y[:cut]), TensorSource(x[cut:], y[cut:])


def _mse(head: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return nn.functional.mse_loss(head(x).squeeze(-1), y)


def _val_mse(head: nn.Module, source: TensorSource) -> dict[str, float]:
    return {"loss": float(_mse(head, (source.x, source.y)))}


def test_lr_grid_picks_the_lr_with_the_best_validation_metric(tmp_path: Path) -> None:
    train, val = _regression()
    # 1e-4 barely moves in 4 epochs, 5.0 diverges (the Hessian of the MSE is about 2I): 0.05 must win.
    cfg = SupervisedConfig(lrs=(1e-4, 0.05, 5.0), epochs=4, batch_size=32, optimizer="sgd", momentum=0.0)
    result = train_supervised(
        lambda: nn.Linear(4, 1),
        train,
        _mse,
        cfg,
        val=val,
        metric_fn=_val_mse,
        log_path=tmp_path / "log.jsonl",
        plot_path=tmp_path / "loss.png",
        show_progress=False,
    )
    by_lr = {run["lr"]: run["metric"] for run in result.per_lr}
    assert result.best_lr == 0.05 and result.best_metric == by_lr[0.05] < 0.5
    assert by_lr[1e-4] > 5.0 and not by_lr[5.0] < by_lr[0.05]  # diverged: inf or NaN, never chosen
    with torch.no_grad():
        assert _val_mse(result.head, val)["loss"] == pytest.approx(result.best_metric)  # the kept head is the best
    assert all(torch.equal(v, result.head.state_dict()[k]) for k, v in result.state_dict.items())

    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["lr"], r["epoch"]) for r in rows] == [(lr, e) for lr in cfg.lrs for e in range(1, 5)]
    assert {"train_loss", "val_loss", "last_lr"} <= set(rows[0])
    with Image.open(tmp_path / "loss.png") as image:
        image.load()  # decodes the whole PNG
        assert image.size[0] > 100 and image.size[1] > 100


def test_early_stopping_stops_after_patience_and_restores_the_best_epoch(tmp_path: Path) -> None:
    train, val = _regression()
    scripted = iter([5.0, 3.0, 4.0, 3.5, 1.0, 1.0])  # best at epoch 2; epochs 3 and 4 do not improve
    snapshots: list[dict[str, Tensor]] = []

    def metric(head: nn.Module, _: TensorSource) -> dict[str, float]:
        snapshots.append(copy.deepcopy(head.state_dict()))
        return {"score": next(scripted)}

    cfg = SupervisedConfig(lrs=(0.01,), epochs=6, batch_size=32, patience=2, select="score", mode="min")
    result = train_supervised(
        lambda: nn.Linear(4, 1),
        train,
        _mse,
        cfg,
        val=val,
        metric_fn=metric,
        log_path=tmp_path / "log.jsonl",
        show_progress=False,
    )
    assert len(snapshots) == 4 and result.per_lr[0]["epochs_run"] == 4
    assert result.best_epoch == 2 and result.best_metric == 3.0
    assert not torch.equal(snapshots[1]["weight"], snapshots[3]["weight"])  # training went on after the best
    for key, value in snapshots[1].items():
        assert torch.equal(result.head.state_dict()[key], value)
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 4


def test_restore_best_false_keeps_the_last_epoch() -> None:
    train, val = _regression()
    scores = iter([1.0, 2.0, 3.0])
    cfg = SupervisedConfig(lrs=(0.01,), epochs=3, batch_size=64, restore_best=False, select="s")
    result = train_supervised(
        lambda: nn.Linear(4, 1),
        train,
        _mse,
        cfg,
        val=val,
        metric_fn=lambda h, v: {"s": next(scores)},
        show_progress=False,
    )
    assert result.best_epoch == 3 and result.best_metric == 3.0


def test_same_seed_same_result_and_every_lr_starts_from_one_init() -> None:
    train, val = _regression()
    inits: list[Tensor] = []

    def make_head() -> nn.Module:
        head = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))  # dropout draws from the seeded RNG
        inits.append(head[0].weight.detach().clone())
        return head

    def run(seed: int) -> tuple[dict[str, Tensor], list[dict]]:
        cfg = SupervisedConfig(
            lrs=(1e-3, 1e-2), epochs=3, batch_size=16, seed=seed, schedule="cosine", warmup_epochs=0.5
        )
        result = train_supervised(make_head, train, _mse, cfg, val=val, metric_fn=_val_mse, show_progress=False)
        return result.state_dict, [{k: v for k, v in r.items() if k != "time"} for r in result.history]

    (state_a, hist_a), (state_b, hist_b), (state_c, _) = run(0), run(0), run(1)
    assert hist_a == hist_b and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    assert torch.equal(inits[0], inits[1]) and torch.equal(inits[0], inits[2])
    assert not torch.equal(inits[0], inits[4])  # seed 1


def test_skipped_batches_and_weighted_epoch_loss() -> None:
    train, _ = _regression(n=64)
    calls = {"n": 0}

    def loss(head: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, float] | None:
        calls["n"] += 1
        return None if calls["n"] % 2 else (_mse(head, batch), 10.0)

    cfg = SupervisedConfig(lrs=(0.01,), epochs=2, batch_size=8)
    result = train_supervised(lambda: nn.Linear(4, 1), train, loss, cfg, show_progress=False)
    assert math.isfinite(result.history[0]["train_loss"]) and result.best_epoch == 2 and result.best_metric is None


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"epochs": 0}, "epochs"),
        ({"lrs": ()}, "lrs"),
        ({"lrs": (1e-3, 0.0)}, "lrs"),
        ({"lrs": (-1.0,)}, "lrs"),
        ({"lrs": (float("nan"),)}, "lrs"),
        ({"patience": 0}, "patience"),
        ({"batch_size": 0}, "batch_size"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"optimizer": "adam"}, "optimizer"),
        ({"mode": "up"}, "mode"),
        ({"schedule": "step"}, "schedule"),
        ({"momentum": 1.0}, "momentum"),
    ],
)
def test_bad_ranges_are_user_errors(changes: dict, field: str) -> None:
    train, val = _regression(n=16)
    with pytest.raises(DinoscopeError) as err:
        train_supervised(
            lambda: nn.Linear(4, 1),
            train,
            _mse,
            SupervisedConfig(**changes),
            val=val,
            metric_fn=_val_mse,
            show_progress=False,
        )
    assert err.value.field == field


def test_grid_without_validation_and_unknown_metric_are_user_errors() -> None:
    train, val = _regression(n=16)
    with pytest.raises(DinoscopeError, match="validation"):
        train_supervised(lambda: nn.Linear(4, 1), train, _mse, SupervisedConfig(lrs=(1e-3, 1e-2)))
    with pytest.raises(DinoscopeError, match="'mae'"):
        train_supervised(
            lambda: nn.Linear(4, 1),
            train,
            _mse,
            SupervisedConfig(select="mae", epochs=1),
            val=val,
            metric_fn=_val_mse,
            show_progress=False,
        )


def test_ssl_loss_curve_is_drawn_through_core_plots(tmp_path: Path) -> None:
    rows = [
        {"iteration": i, "loss/total": 10 - i, "loss/dino": 8 - i, "loss/koleo": -0.1, "lr": 1e-3 * i}
        for i in range(1, 6)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = write_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss_curve.png")
    with Image.open(out) as image:
        image.load()
    assert write_loss_curve(tmp_path / "missing.jsonl", tmp_path / "x.png") is None


def test_library_code_never_uses_pyplot_or_switches_the_backend() -> None:
    pattern = re.compile(r"matplotlib\.use\(|import\s+matplotlib\.pyplot|from\s+matplotlib\s+import\s+[^\n]*pyplot")
    offenders = {
        str(path.relative_to(REPO))
        for package in ("core", "geodino", "bio")
        for path in (REPO / package).rglob("*.py")
        if pattern.search(path.read_text())
    }
    assert offenders <= PYPLOT_PENDING, f"use core.plots (Figure + FigureCanvasAgg) instead of pyplot in {offenders}"
