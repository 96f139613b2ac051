"""kNN / linear evaluation, the periodic kNN during training, distillation and bag-of-channels pretraining."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.cli import main
from core.eval.knn import knn_classify
from core.eval.linear import train_linear_grid
from core.models import vit_test
from core.weights import load_backbone, save_backbone
from core.weights.meta import WeightMeta

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny" / "pretrain.yaml")
SHORT = [
    "train.max_iters=4",
    "train.checkpoint_every=4",
    "train.log_every=1",
    "data.params.n=32",
    "optim.warmup_epochs=0.01",
    "teacher.warmup_teacher_temp_epochs=0.01",
    "optim.freeze_last_layer_epochs=0.01",
]


def test_weighted_knn_votes_with_softmax_weights() -> None:
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    preds = knn_classify(train, labels, test, ks=[1, 5])
    assert preds[1].tolist() == [0, 1]
    # With k=5 the three class-1 points outvote only if the softmax(sim/T) weights say so: they do not for query 0.
    assert preds[5].tolist() == [0, 1]


def test_linear_grid_learns_a_separable_problem() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    result = train_linear_grid(x[:150], y[:150], x[150:], y[150:], lrs=(1e-3, 0.1), epochs=20)
    assert result["top1"] > 90 and set(result["top1_per_lr"]) == {1e-3, 0.1}


def _export_random(path: Path, **kwargs: object) -> Path:
    torch.manual_seed(0)
    model = vit_test(patch_size=8, img_size=32, init_values=1.0, **kwargs)
    meta = WeightMeta(
        arch="vit_test",
        model_kwargs={
            "img_size": 32,
            "patch_size": 8,
            "in_chans": 3,
            "embed_dim": 64,
            "depth": 2,
            "num_heads": 4,
            "init_values": 1.0,
        },
        channel_names=["r", "g", "b"],
        mean=[0.5] * 3,
        std=[0.25] * 3,
    )
    return save_backbone(model, meta, path)


@pytest.mark.parametrize("protocol", ["knn", "linear"])
def test_eval_cli(tmp_path: Path, protocol: str, capsys: pytest.CaptureFixture) -> None:
    weights = _export_random(tmp_path / "w.safetensors")
    args = [
        "eval",
        protocol,
        str(weights),
        "--kind",
        "synthetic_shapes",
        "--size",
        "32",
        "--train",
        "n=40",
        "size=32",
        "seed=1",
        "--val",
        "n=20",
        "size=32",
        "seed=2",
        "--out",
        str(tmp_path / "r.json"),
    ]
    args += ["--k", "5,10"] if protocol == "knn" else ["--epochs", "5"]
    assert main(args) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["n_train"] == 40 and result["n_val"] == 20
    assert (set(result["top1"]) == {"5", "10"}) if protocol == "knn" else (0 <= result["top1"] <= 100)


def test_periodic_knn_during_pretraining(tmp_path: Path) -> None:
    run = tmp_path / "run"
    evalset = "{kind: synthetic_shapes, params: {n: 24, size: 32, seed: %d, labelled: true}}"
    assert (
        main(
            [
                "pretrain",
                TINY,
                *SHORT,
                "eval.every=2",
                f"eval.train={evalset % 1}",
                f"eval.val={evalset % 2}",
                "eval.ks=[3]",
                "--output-dir",
                str(run),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (run / "eval_knn.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [2, 4] and all(0 <= r["knn/top1_k3"] <= 100 for r in rows)


def test_distillation_from_a_frozen_bigger_teacher(tmp_path: Path) -> None:
    teacher = _export_random(tmp_path / "teacher.safetensors")  # stands in for a big pretrained backbone
    run = tmp_path / "distill"
    assert (
        main(
            [
                "pretrain",
                TINY,
                *SHORT,
                f"distill.teacher_weights={teacher}",
                "model.arch=custom",
                "model.embed_dim=32",
                "model.depth=1",
                "model.num_heads=2",
                "--output-dir",
                str(run),
            ]
        )
        == 0
    )
    ckpt = torch.load(run / "checkpoints" / "step_00000004" / "teacher.pt", weights_only=True)
    frozen, _ = load_backbone(teacher)
    for key, value in frozen.state_dict().items():  # the teacher never moved
        torch.testing.assert_close(ckpt[f"backbone.{key}"], value)
    assert main(["export", str(run), str(tmp_path / "student.safetensors")]) == 0


def test_bag_of_channels_pretraining_folds_channels(tmp_path: Path) -> None:
    run = tmp_path / "boc"
    assert (
        main(
            [
                "pretrain",
                TINY,
                *SHORT,
                "model.channel_adaptive=true",
                "model.in_chans=1",
                "crops.channel_mode=fluorescence",
                "data.params.channels=4",
                "--output-dir",
                str(run),
            ]
        )
        == 0
    )
    assert main(["export", str(run), str(tmp_path / "boc.safetensors")]) == 0
    model, meta = load_backbone(tmp_path / "boc.safetensors")
    assert meta.channel_adaptive and meta.in_chans == 1
    with torch.no_grad():
        cls = model.get_intermediate_layers(torch.randn(2, 5, 32, 32), 1, return_class_token=True)[0][1]
    assert cls.shape == (2, 5 * 64)
