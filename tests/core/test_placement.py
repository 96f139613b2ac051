"""Device placement in one place (core.distributed.device): the rules, and proof that every tensor reaching the model in
training and evaluation went through :func:`place`."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import core.distributed.device as device_module
import core.train.loop as loop_module
from core.config import PretrainRecipe, load_recipe
from core.distributed.device import module_device, place, resolve_device, wants_pinned_memory
from core.errors import DinoscopeError

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny" / "pretrain.yaml")
SHORT = [
    "train.max_iters=3",
    "train.checkpoint_every=3",
    "train.log_every=1",
    "data.params.n=32",
    "optim.warmup_epochs=0.01",
    "teacher.warmup_teacher_temp_epochs=0.01",
    "optim.freeze_last_layer_epochs=0.01",
]


def test_resolution_rules_on_a_cpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    for requested in ("cuda", "cuda:1"):
        with pytest.raises(DinoscopeError, match="no usable CUDA device") as err:
            resolve_device(requested)
        assert "train.device=cpu" in str(err.value)
    with pytest.raises(DinoscopeError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    assert not wants_pinned_memory(torch.device("cpu")) and not wants_pinned_memory(torch.device("cpu"), True)


def test_resolution_rules_with_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA, ``auto`` and ``cuda`` mean the local rank's GPU; a GPU index the node lacks is refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 3) == resolve_device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0) and resolve_device("cpu").type == "cpu"
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(DinoscopeError, match="GPU 5 was asked for"):
        resolve_device("auto")
    assert wants_pinned_memory(torch.device("cuda", 0)) and not wants_pinned_memory(torch.device("cuda", 0), False)


def test_place_rebuilds_containers_and_keeps_other_values() -> None:
    pair = namedtuple("pair", "a b")
    batch = {"x": torch.ones(2), "nested": [torch.zeros(1), (torch.ones(3), 7)], "n": 3, "p": pair(torch.ones(1), "s")}
    placed = place(batch, "cpu")
    assert placed["x"] is batch["x"]  # already there: no copy
    assert placed["n"] == 3 and placed["nested"][1][1] == 7 and isinstance(placed["p"], pair)
    assert module_device(nn.Linear(2, 2)) == torch.device("cpu") and module_device(nn.Module()).type == "cpu"


def test_every_tensor_reaching_the_model_went_through_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    placed: dict[int, torch.Tensor] = {}  # id -> tensor (kept alive so ids stay unique)
    checked: list[str] = []

    def recording_place(obj: Any, device: Any, **kwargs: Any) -> Any:
        out = device_module.place(obj, device, **kwargs)
        for tensor in _tensors(out):
            placed[id(tensor)] = tensor
        return out

    def check(where: str, obj: Any) -> None:
        tensors = list(_tensors(obj))
        assert tensors, where
        missing = [tuple(t.shape) for t in tensors if id(t) not in placed]
        assert not missing, f"{where} received tensors that bypassed place(): {missing}"
        checked.append(where)

    real_place_module = loop_module.place_module

    def hooking_place_module(module: nn.Module, device: Any) -> nn.Module:
        module = real_place_module(module, device)
        module.register_forward_pre_hook(lambda m, args, kwargs: check("meta_arch", (args, kwargs)), with_kwargs=True)
        for role in ("student", "teacher"):
            getattr(module, role)["backbone"].register_forward_pre_hook(
                lambda m, args, kwargs, role=role: check(f"{role} backbone", (args, kwargs)), with_kwargs=True
            )
        return module

    monkeypatch.setattr(loop_module, "place", recording_place)
    monkeypatch.setattr(loop_module, "place_module", hooking_place_module)
    recipe = load_recipe(PretrainRecipe, TINY, SHORT)
    loop_module.train(recipe, tmp_path / "run")
    assert checked.count("meta_arch") == 3 and checked.count("student backbone") == 3  # one call per step
    assert checked.count("teacher backbone") == 3


def test_evaluation_features_go_through_place(monkeypatch: pytest.MonkeyPatch) -> None:
    import core.eval.features as features
    from core.data import build_dataset
    from core.models import build_backbone

    seen: list[torch.device] = []

    def recording_place(obj: Any, device: Any, **kwargs: Any) -> Any:
        seen.append(torch.device(device))
        return device_module.place(obj, device, **kwargs)

    monkeypatch.setattr(features, "place", recording_place)
    dataset = build_dataset("synthetic_shapes", n=6, size=32, seed=0, labelled=True)
    backbone = build_backbone("vit_test", patch_size=8, img_size=32)
    feats, labels = features.extract(backbone, dataset, size=32, batch_size=4)
    assert seen == [torch.device("cpu")] * 2 and feats.shape[0] == labels.shape[0] == 6


def _tensors(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)
