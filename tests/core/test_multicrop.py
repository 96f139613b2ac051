"""MultiCropAugmentation: DINOv2 crop layout, dtype scaling, normalisation, per-mode photometrics, blur
probabilities, seeding (including DataLoader workers) and argument validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from bio.augment import CELL_DINO_CROPS
from core.data import BLUR_PROBS, MultiCropAugmentation, read_image
from core.data.photometric import ChannelIntensityJitter
from core.errors import DinoscopeError
from core.weights.meta import IMAGENET_MEAN, IMAGENET_STD

REAL = Path(__file__).parents[1] / "data" / "real"
NO_PHOTOMETRY = {"color_jitter_prob": 0.0, "grayscale_prob": 0.0, "solarize_prob": 0.0, "blur_probs": (0, 0, 0)}


def _image(h: int, w: int, c: int, dtype: type = np.uint8, seed: int = 0) -> np.ndarray:
    values = np.random.default_rng(seed).random((h, w, c))
    if dtype == np.uint8:
        return (values * 255).astype(np.uint8)
    if dtype == np.uint16:
        return (values * 65535).astype(np.uint16)
    return values.astype(dtype)


def _small(**kwargs: object) -> MultiCropAugmentation:
    defaults = {"global_crops_size": 16, "local_crops_size": 8, "local_crops_number": 2, "seed": 0}
    return MultiCropAugmentation(**{**defaults, **kwargs})


def test_dinov2_defaults_give_two_global_and_eight_local_crops() -> None:
    augment = MultiCropAugmentation(seed=0)
    out = augment(_image(300, 260, 3))
    assert set(out) == {"global_crops", "global_crops_teacher", "local_crops"}
    assert [tuple(t.shape) for t in out["global_crops"]] == [(3, 224, 224)] * 2
    assert [tuple(t.shape) for t in out["local_crops"]] == [(3, 96, 96)] * 8
    assert out["global_crops_teacher"] is out["global_crops"]
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in out["global_crops"] + out["local_crops"])
    assert augment.blur_probs == BLUR_PROBS["released"] == (0.0, 0.9, 0.5)
    assert augment.normalisation(3) == (list(IMAGENET_MEAN), list(IMAGENET_STD))


def test_real_orthophoto_and_nuclei_images() -> None:
    photo = MultiCropAugmentation(global_crops_size=64, local_crops_size=32, seed=0)(read_image(REAL / "OSBS_029.tif"))
    assert photo["global_crops"][0].shape == (3, 64, 64) and len(photo["local_crops"]) == 8
    nuclei = read_image(REAL / "nuclei_dsb2018_img.tif")  # uint16 with values up to 235 only
    cells = MultiCropAugmentation(
        channel_mode="fluorescence",
        global_crops_size=64,
        local_crops_size=32,
        local_crops_number=2,
        seed=0,
        **CELL_DINO_CROPS,
    )(nuclei)
    crop = cells["global_crops"][0]
    assert crop.shape == (1, 64, 64)
    # Self-standardisation makes the dim 16-bit image usable without knowing its true range.
    assert abs(float(crop.mean())) < 1e-4 and abs(float(crop.std(unbiased=False)) - 1) < 1e-3


@pytest.mark.parametrize("mode", ["multispectral", "fluorescence"])
@pytest.mark.parametrize("channels", [1, 2, 5, 13, 16, 20])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_any_channel_count_and_dtype(mode: str, channels: int, dtype: type) -> None:
    out = _small(channel_mode=mode)(_image(40, 30, channels, dtype))
    shapes = [tuple(t.shape) for t in out["global_crops"] + out["local_crops"]]
    assert shapes == [(channels, 16, 16)] * 2 + [(channels, 8, 8)] * 2
    assert all(torch.isfinite(t).all() for t in out["global_crops"] + out["local_crops"])


def test_dtype_scaling_gives_the_same_crops() -> None:
    """uint8 / 255, uint16 / 65535, float as-is and uint16 / max_value all land on the same [0, 1] values."""
    base = _image(32, 32, 4)
    as_unit = base.astype(np.float32) / 255
    inputs = {
        "uint8": (base, None),
        "uint16": (base.astype(np.uint16) * 257, None),
        "float32": (as_unit, None),
        "12-bit": ((as_unit * 4095).round().astype(np.uint16), 4095.0),
    }
    crops = {}
    for name, (image, max_value) in inputs.items():
        # Bilinear: bicubic overshoot is saturated for integer dtypes only, which is not what this test is about.
        augment = _small(
            channel_mode="multispectral",
            max_value=max_value,
            mean=[0.0] * 4,
            std=[1.0] * 4,
            interpolation="bilinear",
            **NO_PHOTOMETRY,
        )
        crops[name] = torch.stack(augment(image)["global_crops"])
    for name in ("uint16", "float32", "12-bit"):
        torch.testing.assert_close(crops[name], crops["uint8"], atol=3e-3, rtol=0)


def test_normalisation_uses_given_mean_and_std() -> None:
    image = np.full((20, 20, 2), 51, dtype=np.uint8)  # 0.2 after scaling
    augment = _small(channel_mode="multispectral", mean=[0.1, 0.3], std=[0.5, 0.25], **NO_PHOTOMETRY)
    crop = augment(image)["local_crops"][0]
    torch.testing.assert_close(crop[0], torch.full((8, 8), 0.2), atol=1e-5, rtol=0)
    torch.testing.assert_close(crop[1], torch.full((8, 8), -0.4), atol=1e-5, rtol=0)
    assert augment.normalisation(2) == ([0.1, 0.3], [0.5, 0.25])
    assert _small(channel_mode="multispectral").normalisation(4) == ([0.5] * 4, [0.25] * 4)


def test_rgb_grayscale_and_solarize_on_second_global_crop_only() -> None:
    image = np.full((24, 24, 3), (204, 102, 51), dtype=np.uint8)
    unit = {"mean": [0.0] * 3, "std": [1.0] * 3, "blur_probs": (0, 0, 0), "color_jitter_prob": 0.0}
    gray = _small(grayscale_prob=1.0, solarize_prob=0.0, **unit)(image)
    for crop in gray["global_crops"] + gray["local_crops"]:
        assert torch.allclose(crop[0], crop[1], atol=1e-6) and torch.allclose(crop[1], crop[2], atol=1e-6)
    solarized = _small(grayscale_prob=0.0, solarize_prob=1.0, **unit)(image)
    first, second = solarized["global_crops"]
    torch.testing.assert_close(first[:, 0, 0], torch.tensor([0.8, 0.4, 0.2]), atol=1e-6, rtol=0)
    torch.testing.assert_close(second[:, 0, 0], torch.tensor([0.2, 0.4, 0.2]), atol=1e-6, rtol=0)
    torch.testing.assert_close(solarized["local_crops"][0][:, 0, 0], torch.tensor([0.8, 0.4, 0.2]), atol=1e-6, rtol=0)


def _blur_rates(blur_probs: object, n: int = 150) -> tuple[float, float, float]:
    """Fraction of blurred crops per slot, using full-image crops of a symmetric checkerboard (flips are no-ops,
    so any change is the blur; sigma >= 1 so that every blur is visible)."""
    board = (np.indices((16, 16)).sum(0) % 2 * 255).astype(np.uint8)[..., None]
    board = np.concatenate([board, board[:, ::-1]], axis=1)[:, 8:24]  # mirror-symmetric in both axes
    board = np.concatenate([board, board[::-1]], axis=0)[8:24]
    augment = MultiCropAugmentation(
        global_crops_size=16,
        local_crops_size=16,
        local_crops_number=4,
        global_crops_scale=(1.0, 1.0),
        local_crops_scale=(1.0, 1.0),
        crop_ratio=(1, 1),
        interpolation="nearest",
        channel_mode="multispectral",
        mean=[0.0],
        std=[1.0],
        color_jitter_prob=0.0,
        blur_probs=blur_probs,
        blur_sigma=(1.0, 2.0),
        seed=5,
    )
    reference = torch.from_numpy(board[..., 0] / 255.0).float()
    counts = np.zeros(3)
    for _ in range(n):
        out = augment(board)
        first, second = (not torch.allclose(c[0], reference) for c in out["global_crops"])
        local = np.mean([not torch.allclose(c[0], reference) for c in out["local_crops"]])
        counts += (first, second, local)
    return tuple(counts / n)


def test_blur_probabilities_released_and_paper() -> None:
    first, second, local = _blur_rates("released")
    assert first == 0.0 and 0.8 <= second <= 0.97 and 0.4 <= local <= 0.6
    first, second, local = _blur_rates("paper")
    assert first == 1.0 and 0.03 <= second <= 0.2 and 0.4 <= local <= 0.6
    assert _blur_rates((0.0, 0.0, 1.0), n=10) == (0.0, 0.0, 1.0)


def test_fluorescence_self_standardises_flips_vertically_and_drops_unprotected_channels() -> None:
    image = _image(32, 32, 3, np.uint16)
    out = _small(channel_mode="fluorescence")(image)
    for crop in out["global_crops"] + out["local_crops"]:
        torch.testing.assert_close(crop.mean((1, 2)), torch.zeros(3), atol=1e-4, rtol=0)
        torch.testing.assert_close(crop.std((1, 2), unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    # Full-image crops without jitter: only flips change the image; vertical ones must occur by default.
    gradient = np.repeat(np.arange(16, dtype=np.float32)[:, None, None], 16, axis=1)
    flips = _small(
        channel_mode="fluorescence",
        global_crops_size=16,
        global_crops_scale=(1, 1),
        crop_ratio=(1, 1),
        hflip_prob=0.0,
        intensity_jitter_std=0.0,
        local_crops_number=0,
    )
    tops = {float(flips(gradient)["global_crops"][0][0, 0, 0]) for _ in range(20)}
    assert len(tops) == 2
    dropped = _small(channel_mode="fluorescence", channel_drop_prob=1.0, protected_channels=(1,))(
        _image(32, 32, 2, np.uint16)
    )
    for crop in dropped["global_crops"] + dropped["local_crops"]:
        assert torch.count_nonzero(crop[0]) == 0 and torch.count_nonzero(crop[1]) > 0


def test_per_channel_intensity_jitter_is_independent_per_channel() -> None:
    jitter = ChannelIntensityJitter(brightness=0.4, contrast=0.0, distribution="uniform", p=1.0)
    jitter.set_random_seed(0)
    out = jitter(image=np.full((4, 4, 6), 0.5, dtype=np.float32))["image"]
    factors = out[0, 0] / 0.5
    assert np.allclose(out, out[:1, :1]) and len(np.unique(factors.round(6))) == 6
    assert ((factors >= 0.6) & (factors <= 1.4)).all()
    cell = ChannelIntensityJitter(brightness=1.0, contrast=0.0, distribution="normal", p=1.0)
    cell.set_random_seed(0)
    factors = cell(image=np.ones((1, 1, 2000), dtype=np.float32))["image"].ravel()
    assert factors.min() == pytest.approx(0.5) and 0.2 < (factors == 0.5).mean() < 0.4


def test_seed_makes_crops_reproducible() -> None:
    image = _image(40, 40, 3)
    first, second, other = (_small(seed=s)(image) for s in (7, 7, 8))
    assert all(torch.equal(a, b) for a, b in zip(first["local_crops"], second["local_crops"], strict=True))
    assert not torch.equal(first["global_crops"][0], other["global_crops"][0])


class _SameImage(Dataset):
    def __init__(self, transform: MultiCropAugmentation, reseed_per_index: bool = False) -> None:
        self.image, self.transform, self.reseed_per_index = _image(40, 40, 3), transform, reseed_per_index

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.reseed_per_index:
            self.transform.reseed([11, index])
        return self.transform(self.image)["global_crops"][0]


def test_dataloader_workers_get_different_streams() -> None:
    crops = list(DataLoader(_SameImage(_small(seed=3)), batch_size=None, num_workers=2))
    # Items 0 and 1 come from different (forked) workers, whose generators start as copies of the parent's.
    assert not torch.equal(crops[0], crops[1])


def test_explicit_reseed_is_honoured_inside_workers() -> None:
    """Position-seeded augmentation (for exact resume) must give the same crops in a worker as in the parent."""
    in_workers = list(DataLoader(_SameImage(_small(), reseed_per_index=True), batch_size=None, num_workers=2))
    in_parent = [_SameImage(_small(), reseed_per_index=True)[i] for i in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(in_workers, in_parent, strict=True))
    assert not torch.equal(in_parent[0], in_parent[1])


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"channel_mode": "rgb", "in_chans": 4}, "channel_mode"),
        ({"channel_mode": "rgb", "mean": [0.5] * 4, "std": [0.2] * 4}, "channel_mode"),
        ({"channel_mode": "multispectral", "in_chans": 5, "mean": [0.5] * 4, "std": [0.2] * 4}, "mean"),
        ({"channel_mode": "multispectral", "mean": [0.5] * 4, "std": [0.2] * 3}, "std"),
        ({"channel_mode": "multispectral", "mean": [0.5] * 2}, "std"),
        ({"channel_mode": "multispectral", "mean": [0.5] * 2, "std": [0.2, 0.0]}, "std"),
        ({"channel_mode": "fluorescence", "mean": [0.5], "std": [0.2]}, "mean"),
        ({"channel_mode": "hyperspectral"}, "channel_mode"),
        ({"blur_probs": "nominal"}, "blur_probs"),
        ({"blur_probs": (0.1, 0.2)}, "blur_probs"),
        ({"global_crops_scale": (0.5, 0.2)}, "global_crops_scale"),
        ({"hflip_prob": 1.5}, "hflip_prob"),
        ({"interpolation": "cubic"}, "interpolation"),
        ({"local_crops_number": -1}, "local_crops_number"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(DinoscopeError) as info:
        MultiCropAugmentation(**kwargs)
    assert info.value.field == field


def test_bad_images_are_rejected_at_call_time() -> None:
    with pytest.raises(DinoscopeError, match="'rgb' needs 3 channels"):
        _small()(_image(20, 20, 4))
    with pytest.raises(DinoscopeError, match="expects 5"):
        _small(channel_mode="multispectral", in_chans=5)(_image(20, 20, 4))
    with pytest.raises(DinoscopeError, match="int32"):
        _small(channel_mode="multispectral")(np.zeros((20, 20, 2), dtype=np.int32))
    with pytest.raises(DinoscopeError, match="numpy array"):
        _small()(torch.zeros(3, 20, 20))
