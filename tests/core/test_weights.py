"""load_backbone on every supported checkpoint family, channel adaptation, export round trip and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from core.cli import main
from core.errors import DinoscopeError
from core.weights import detect_format, load_backbone, save_backbone

DATA = Path(__file__).parents[1] / "data"
VIT = torch.load(DATA / "dinov2_reference" / "vit_p14_noreg.pt", weights_only=True)
REG = torch.load(DATA / "dinov2_reference" / "vit_p14_reg4.pt", weights_only=True)
BOC = torch.load(DATA / "dinov2_reference" / "cell_dino_bag_of_channels.pt", weights_only=True)
HEAD = torch.load(DATA / "dinov2_reference" / "dino_head.pt", weights_only=True)
HRCH = torch.load(DATA / "hrch_reference" / "hrch_small.pt", weights_only=True)


def _chunked(sd: dict, chunks: int, depth: int) -> dict:
    size = depth // chunks
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // size}.{k[len('blocks.') :]}"
        out[k] = v
    return out


def _check_vit(model: torch.nn.Module, fx: dict) -> None:
    with torch.no_grad():
        for name in ("sq", "rect"):
            out = model.forward_features(fx["inputs"][name])["x_norm_patchtokens"]
            torch.testing.assert_close(out, fx["outputs"][name]["x_norm_patchtokens"], atol=1e-5, rtol=1e-5)


def test_hub_state_dict_from_file(tmp_path: Path) -> None:
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(REG["state_dict"], path)
    model, meta = load_backbone(path, num_heads=4)
    assert meta.source_format == "dinov2_hub" and meta.num_register_tokens == 4
    # Hub _reg convention: size= interpolation with antialias.
    assert meta.model_kwargs["interpolate_offset"] == 0.0 and meta.model_kwargs["interpolate_antialias"]
    _check_vit(model, REG)


def test_chunked_training_checkpoint_teacher_and_student(tmp_path: Path) -> None:
    chunked = _chunked(VIT["state_dict"], chunks=2, depth=2)
    teacher = {f"teacher.backbone.{k}": v for k, v in chunked.items()}
    teacher.update({f"teacher.dino_head.{k}": v for k, v in HEAD["state_dict"].items()})
    student = {f"student.backbone.{k}": v * 0 for k, v in chunked.items()}
    path = tmp_path / "model_0001249.rank_0.pth"
    torch.save({"model": {**teacher, **student}, "iteration": 1249}, path)
    model, meta = load_backbone(path, num_heads=4)
    assert meta.source_format == "dinov2_train"
    _check_vit(model, VIT)
    student_model, _ = load_backbone(path, num_heads=4, branch="student")
    assert all(float(p.detach().abs().sum()) == 0 for p in student_model.parameters())
    # The eval-style teacher_checkpoint.pth layout: {"teacher": {backbone.*, dino_head.*}}.
    torch.save({"teacher": {k[len("teacher.") :]: v for k, v in teacher.items()}}, tmp_path / "teacher.pth")
    model2, meta2 = load_backbone(tmp_path / "teacher.pth", num_heads=4)
    assert meta2.source_format == "dinov2_train"
    _check_vit(model2, VIT)


def test_cell_dino_chunked_bag_of_channels() -> None:
    sd = _chunked(BOC["state_dict"], chunks=2, depth=2)
    assert detect_format(sd) == "cell_dino"
    model, meta = load_backbone(sd, num_heads=4)
    assert meta.channel_adaptive and meta.in_chans == 1
    assert meta.mean == [0.0] and meta.std == [1.0]  # Cell-DINO self-standardises each image
    with torch.no_grad():
        cls = model.get_intermediate_layers(BOC["inputs"]["x"], 2, return_class_token=True)[-1][1]
    torch.testing.assert_close(cls, BOC["outputs"]["gil_cls_1"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["x", "x_odd"])
def test_hrch_backbone_matches_official_features(name: str) -> None:
    model, meta = load_backbone(HRCH["state_dict"], num_heads=4)
    assert meta.source_format == "hrch" and meta.patch_size == 16
    assert meta.mean == [0.430, 0.411, 0.296]
    x = HRCH["inputs"][name]
    H, W = x.shape[-2:]
    x = F.pad(x, (0, -W % 16, 0, -H % 16))  # HRCH pads bottom/right
    out = HRCH["outputs"][name]
    with torch.no_grad():
        layers = model.get_intermediate_layers(
            x, n=HRCH["config"]["backbone"]["out_indices"], reshape=True, return_class_token=True, norm=False
        )
        n = out["pos_embed_interp"].shape[1]
        pos = model.interpolate_pos_encoding(torch.zeros(1, n, meta.embed_dim), *x.shape[-2:])
    torch.testing.assert_close(pos, out["pos_embed_interp"], atol=1e-5, rtol=1e-5)
    for i, (feat, cls) in enumerate(layers):
        torch.testing.assert_close(feat, out[f"backbone_feat_{i}"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cls, out[f"backbone_cls_{i}"], atol=1e-5, rtol=1e-5)


def test_export_round_trip_keeps_meta_and_numbers(tmp_path: Path) -> None:
    model, meta = load_backbone(REG["state_dict"], num_heads=4, channel_names=["r", "g", "b"])
    meta.extra["recipe"] = "unit-test"
    path = save_backbone(model, meta, tmp_path / "export" / "vit.safetensors")
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["format_version"] == 1 and sidecar["channel_names"] == ["r", "g", "b"]
    again, meta2 = load_backbone(path)
    assert meta2.source_format == "dinoscope" and meta2.extra["recipe"] == "unit-test"
    assert meta2.model_kwargs == meta.model_kwargs
    _check_vit(again, REG)
    path.with_suffix(".json").unlink()  # the header copy of the sidecar still describes the weights
    _, meta3 = load_backbone(path)
    assert meta3.channel_names == ["r", "g", "b"]
    assert not list(tmp_path.glob("export/.*tmp*"))  # no temporary leftovers


def test_channel_adaptation_strategies() -> None:
    rgb, _ = load_backbone(VIT["state_dict"], num_heads=4)
    x = VIT["inputs"]["sq"]
    with torch.no_grad():
        ref = rgb(x)
        zero, meta = load_backbone(VIT["state_dict"], num_heads=4, in_chans=5, channel_strategy="zero")
        torch.testing.assert_close(zero(torch.cat([x, torch.randn(2, 2, 56, 56)], 1)), ref)  # extra bands ignored
        rep, meta6 = load_backbone(VIT["state_dict"], num_heads=4, in_chans=6, channel_strategy="repeat")
        torch.testing.assert_close(rep(torch.cat([x, x], 1)), ref, atol=1e-5, rtol=1e-5)
    assert meta.in_chans == 5 and len(meta.mean) == 5 and meta6.mean[3:] == meta6.mean[:3]


def test_strict_loading_lists_bad_keys() -> None:
    sd = dict(VIT["state_dict"])
    sd.pop("norm.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(DinoscopeError) as err:
        load_backbone(sd, num_heads=4, num_register_tokens=2)
    text = str(err.value)
    assert "missing keys [norm.weight, register_tokens]" in text and "unexpected keys [extra.weight]" in text


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a checkpoint at all", "not a readable PyTorch checkpoint"),
        (None, "not a readable PyTorch checkpoint"),  # truncated real file
    ],
)
def test_bad_files_fail_clearly(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "bad.pth"
    if content is None:
        torch.save(VIT["state_dict"], path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(DinoscopeError, match=message):
        load_backbone(path)


def test_non_backbone_and_unknown_width_errors() -> None:
    with pytest.raises(DinoscopeError, match="do not look like a ViT backbone"):
        load_backbone(HEAD["state_dict"])
    with pytest.raises(DinoscopeError, match="pass num_heads"):
        load_backbone(HRCH["state_dict"])  # width 96: heads cannot be inferred


def test_cli_inspect_every_format_and_convert(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    files = {
        "dinov2_hub": (REG["state_dict"], []),
        "dinov2_train": ({f"teacher.backbone.{k}": v for k, v in _chunked(VIT["state_dict"], 2, 2).items()}, []),
        "cell_dino": (_chunked(BOC["state_dict"], 2, 2), []),
        "hrch": (HRCH["state_dict"], []),
    }
    for fmt, (sd, _) in files.items():
        path = tmp_path / f"{fmt}.pth"
        torch.save(sd, path)
        heads = "4"
        assert main(["weights", "inspect", str(path), "--json", "--num-heads", heads]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["format"] == fmt and report["num_heads"] == 4
    out = tmp_path / "conv" / "hrch.safetensors"
    assert main(["weights", "convert", str(tmp_path / "hrch.pth"), str(out), "--num-heads", "4"]) == 0
    capsys.readouterr()
    assert main(["weights", "inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "dinoscope" and report["model_kwargs"]["interpolate_align_corners"] is True
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["weights", "inspect", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "fix:" in err
    assert main(["weights", "inspect", str(tmp_path / "missing.pth")]) == 2


def test_a_dinov3_checkpoint_is_named_and_refused(tmp_path) -> None:
    sd = {
        "cls_token": torch.zeros(1, 1, 8),
        "storage_tokens": torch.zeros(1, 4, 8),
        "rope_embed.periods": torch.ones(2),
        "patch_embed.proj.weight": torch.zeros(8, 3, 16, 16),
    }
    path = tmp_path / "dinov3_vitl16_pretrain_sat493m.pth"
    torch.save(sd, path)
    with pytest.raises(DinoscopeError, match="DINOv3 checkpoint"):
        load_backbone(path)
