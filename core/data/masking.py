"""Block-wise patch masking for the iBOT masked-image-modelling objective.

The generator places random rectangles of patches until the requested number is masked, as described in
BEiT (Bao et al., 2022, "BEiT: BERT Pre-Training of Image Transformers", section 2.5, Algorithm 1), reused by iBOT
(Zhou et al., 2022) and DINOv2 (Oquab et al., 2024; ``dinov2/data/masking.py``). Randomness comes from Python's
global :mod:`random` module, in the same order of draws as the reference, so that a seeded run reproduces the
reference masks exactly.
"""

from __future__ import annotations

import math
import random

import numpy as np

from core.errors import DinoscopeError

_TRIES_PER_BLOCK = 10


class MaskingGenerator:
    """Random rectangles of patches on a ``height x width`` grid.

    Args:
        input_size: patch grid, ``g`` or ``(height, width)`` (16 for 224 px with patch 14).
        num_masking_patches: default request used when the generator is called without an argument.
        min_num_patches: smallest area drawn for one rectangle; requests below it are often left empty.
        max_num_patches: cap on the area of one rectangle; defaults to ``num_masking_patches`` and, if that is
            unset too, to the whole grid. DINOv2 trains with ``0.5 * g * g``.
        min_aspect: smallest height/width ratio of a rectangle; ratios are log-uniform.
        max_aspect: largest ratio; defaults to ``1 / min_aspect``.

    Calling ``generator(n)`` returns a ``height x width`` bool array with at most ``n`` true entries (never more;
    about 92% of requests are hit exactly at the DINOv2 settings).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if height < 1 or width < 1:
            raise DinoscopeError(f"the patch grid must be at least 1x1, got {height}x{width}", field="input_size")
        if min_aspect <= 0 or (max_aspect is not None and max_aspect < min_aspect):
            raise DinoscopeError(
                f"invalid aspect range ({min_aspect}, {max_aspect})",
                field="min_aspect",
                fix="use 0 < min_aspect <= max_aspect, e.g. min_aspect=0.3",
            )
        self.height = int(height)
        self.width = int(width)
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        if max_num_patches is None:
            max_num_patches = self.num_patches if num_masking_patches is None else num_masking_patches
        self.max_num_patches = max_num_patches
        max_aspect = max_aspect if max_aspect is not None else 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}x{self.width}, patches {self.min_num_patches}.."
            f"{self.max_num_patches}, log-aspect {self.log_aspect_ratio[0]:.3f}..{self.log_aspect_ratio[1]:.3f})"
        )

    def get_shape(self) -> tuple[int, int]:
        """``(height, width)`` of the patch grid the masks cover."""
        return self.height, self.width

    def __call__(self, num_masking_patches: int | None = None) -> np.ndarray:
        """Return a ``height x width`` bool mask with at most ``num_masking_patches`` masked patches."""
        if num_masking_patches is None:
            num_masking_patches = self.num_masking_patches or 0
        mask = np.zeros(self.get_shape(), dtype=bool)
        masked = 0
        while masked < num_masking_patches:
            budget = min(num_masking_patches - masked, self.max_num_patches)
            added = self._add_block(mask, budget)
            if added == 0:
                break
            masked += added
        return mask

    def _add_block(self, mask: np.ndarray, budget: float) -> int:
        """Try up to 10 rectangles; mask the first one that adds between 1 and ``budget`` new patches."""
        for _ in range(_TRIES_PER_BLOCK):
            target_area = random.uniform(self.min_num_patches, budget)
            aspect = math.exp(random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            # Strictly smaller than the grid, as in the reference: a full-width block is never placed.
            if w >= self.width or h >= self.height:
                continue
            top = random.randint(0, self.height - h)
            left = random.randint(0, self.width - w)
            block = mask[top : top + h, left : left + w]
            newly_masked = h * w - int(block.sum())
            if 0 < newly_masked <= budget:
                block[...] = True
                return newly_masked
        return 0
