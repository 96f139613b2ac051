"""``synthetic_scenes``: labelled objects in cluttered scenes, where what a class looks like varies as in real images.

:class:`SyntheticScenesDataset` draws one object per image on a busy background. The class is the object's
silhouette paired with its texture (disk + horizontal stripes, square + vertical stripes, triangle + checkerboard,
ring + dots, as in ``synthetic_shapes``), and everything else is a nuisance drawn per image:

* position anywhere in the frame and size (radius 12-34 % of the side, a factor of 3);
* the object's colour (any hue, lighter than the background), the texture's period, phase and contrast;
* the background: a gradient between two dark colours in a random direction, plus soft blobs of others;
* clutter: up to ``clutter`` strokes and specks of any colour, some of them over the object;
* sensor noise.

So raw pixels (template matching) need a labelled example at nearly the same place, size and colour, and a network
that keeps colour and position finds little in common between two images of a class, while a network trained to
give the same answer for crops of one image under colour jitter (DINOv2's self-supervision) can. What a tiny ViT
learns from these images in two CPU minutes, and how it compares with those baselines, is the first section of the
``dinoscope demo`` report. Image ``i`` depends only on ``(seed, i)``; label ``i % num_classes`` keeps the classes
balanced. Images are ``size x size x 3`` uint8.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from core.errors import DinoscopeError
from core.weights.meta import default_channel_names

BACKGROUND_RANGE = (0.0, 0.45)  # per-channel range of background colours: darker than any object
OBJECT_RANGE = (0.55, 1.0)  # per-channel range of object colours: light, of any hue
RADIUS_RANGE = (0.12, 0.34)  # object radius as a fraction of the image side


def balanced_classes(names: tuple[str, ...], num_classes: int, n: int) -> tuple[list[str], list[int]]:
    """The first ``num_classes`` of a synthetic dataset's class ``names`` and the label of each of its ``n`` images
    (round robin, so every class is equally frequent); a clear error for a count outside ``2..len(names)``."""
    if not 2 <= num_classes <= len(names):
        raise DinoscopeError(f"num_classes must be 2..{len(names)}, got {num_classes}", field="num_classes")
    return list(names[:num_classes]), [i % num_classes for i in range(n)]


class SyntheticScenesDataset(Dataset):
    """Labelled objects in cluttered, colourful scenes (see the module docstring).

    Args:
        n: number of images.
        size: side length in pixels (at least 16).
        seed: generator seed.
        labelled: return ``(image, label)`` instead of the image alone.
        num_classes: 2 to 4 classes, taken in the order of :attr:`CLASS_NAMES`.
        clutter: largest number of clutter items per image (0 for a clean background).
    """

    CLASS_NAMES = ("disk_hstripes", "square_vstripes", "triangle_checker", "ring_dots")
    input_params = ()  # generated in memory: reads no files

    def __init__(
        self,
        n: int = 512,
        size: int = 48,
        seed: int = 0,
        labelled: bool = False,
        num_classes: int = 4,
        clutter: int = 3,
    ) -> None:
        if n < 1 or size < 16 or clutter < 0:
            raise DinoscopeError(
                f"need n >= 1, size >= 16 and clutter >= 0, got n={n}, size={size}, clutter={clutter}",
                field="synthetic_scenes",
            )
        self.n, self.size, self.seed, self.clutter = n, size, seed, clutter
        self.labelled = labelled
        self.classes, self.targets = balanced_classes(self.CLASS_NAMES, num_classes, n)
        self.channel_names = default_channel_names(3)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> np.ndarray | tuple[np.ndarray, int]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        label = self.targets[index]
        image = draw_scene(np.random.default_rng([self.seed, index]), label, self.size, self.clutter)
        return (image, label) if self.labelled else image


def _colour(rng: np.random.Generator, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """A random RGB colour, each channel uniform in ``[low, high]``."""
    return rng.uniform(low, high, 3).astype(np.float32)


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / size
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    image = _colour(rng, *BACKGROUND_RANGE) * (1 - ramp[..., None]) + _colour(rng, *BACKGROUND_RANGE) * ramp[..., None]
    for _ in range(int(rng.integers(1, 4))):  # soft blobs of other colours
        cy, cx = rng.uniform(0, size, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (rng.uniform(0.1, 0.3) * size) ** 2))
        image = image + (0.5 * blob)[..., None] * (_colour(rng, *BACKGROUND_RANGE) - image)
    return image


def _clutter_mask(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """A stroke (a thick line segment) or a speck (a small disk) at a random place."""
    cy, cx = rng.uniform(0, size, 2)
    if rng.random() < 0.5:
        angle, half = rng.uniform(0, np.pi), rng.uniform(0.1, 0.3) * size
        along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        return (np.abs(along) <= half) & (np.abs(across) <= rng.uniform(0.5, 1.5))
    return np.hypot(yy - cy, xx - cx) <= rng.uniform(1.0, 0.06 * size + 1.0)


def _object(
    rng: np.random.Generator, label: int, yy: np.ndarray, xx: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(inside mask, texture in {0, 1})`` of the class's silhouette and texture at a random place and size."""
    radius = rng.uniform(*RADIUS_RANGE) * size
    cy, cx = rng.uniform(0.6 * radius, size - 0.6 * radius, 2)
    dy, dx = yy - cy, xx - cx
    period = rng.uniform(0.25, 0.45) * radius + 2.5
    phase = rng.uniform(0, 2 * np.pi)
    wave_y, wave_x = 2 * np.pi * yy / period + phase, 2 * np.pi * xx / period + phase
    distance = np.hypot(dx, dy)
    if label == 0:
        return distance <= radius, np.sin(wave_y) > 0
    if label == 1:
        return np.maximum(abs(dx), abs(dy)) <= 0.85 * radius, np.sin(wave_x) > 0
    if label == 2:
        inside = (dy >= -radius) & (dy <= 0.8 * radius) & (abs(dx) <= (dy + radius) / 1.8)
        return inside, (np.floor(wave_x / np.pi) + np.floor(wave_y / np.pi)) % 2 == 0
    return (distance <= radius) & (distance >= 0.55 * radius), np.sin(wave_x) * np.sin(wave_y) > 0.5


def draw_scene(rng: np.random.Generator, label: int, size: int, clutter: int = 3) -> np.ndarray:
    """One ``size x size x 3`` uint8 scene with an object of class ``label`` (see the module docstring)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = _background(rng, yy, xx, size)
    n_clutter = int(rng.integers(0, clutter + 1)) if clutter else 0
    n_over = int(rng.integers(0, n_clutter + 1)) // 2  # some clutter lies over the object
    for _ in range(n_clutter - n_over):
        image[_clutter_mask(rng, yy, xx, size)] = _colour(rng)
    inside, texture = _object(rng, label, yy, xx, size)
    colour = _colour(rng, *OBJECT_RANGE)
    contrast = rng.uniform(0.3, 0.6)
    foreground = colour * (1 - contrast + contrast * texture.astype(np.float32))[..., None]
    image = np.where(inside[..., None], foreground, image)
    for _ in range(n_over):
        image[_clutter_mask(rng, yy, xx, size)] = _colour(rng)
    image = image + rng.normal(0.0, 0.03, image.shape)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
