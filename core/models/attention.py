"""Multi-head self-attention with interchangeable kernels.

Backends:
    ``sdpa``      PyTorch ``F.scaled_dot_product_attention`` (default; fused flash kernel on CPU and GPU).
    ``math``      explicit ``softmax(q k^T * scale) v``, the textbook form, used as a reference and in benchmarks.
    ``xformers``  ``xformers.ops.memory_efficient_attention``; only used when xformers imports and the tensors are
                  on CUDA, otherwise we fall back to SDPA (xformers has no CPU kernel).
    ``auto``      xformers when usable, else SDPA.

Parameter names (``qkv``, ``proj``) follow the official DINOv2 layout (Oquab et al., arXiv:2304.07193;
facebookresearch/dinov2 ``dinov2/layers/attention.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_BACKENDS = ("auto", "sdpa", "math", "xformers")


@functools.lru_cache(maxsize=1)
def _xformers_ops() -> ModuleType | None:
    try:
        import xformers.ops as xops  # deferred: optional extra [gpu], CUDA only; probed once, cached
    except Exception:  # noqa: BLE001 - ImportError, or a broken binary build for this torch
        return None
    return xops


def xformers_available() -> bool:
    """Whether ``xformers.ops`` imports (optional extra ``[gpu]``); probed once."""
    return _xformers_ops() is not None


class Attention(nn.Module):
    """Self-attention over tokens ``x [B, N, D]`` with ``num_heads`` heads of size ``D / num_heads``."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = backend

    @property
    def backend(self) -> str:
        """The requested kernel, one of :data:`ATTENTION_BACKENDS` (``auto`` is resolved per call)."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        """Set the kernel; ``ValueError`` for a name not in :data:`ATTENTION_BACKENDS`."""
        if value not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {value!r}; choose one of {ATTENTION_BACKENDS}")
        self._backend = value

    def _resolve_backend(self, x: Tensor) -> str:
        if self._backend in ("auto", "xformers"):
            return "xformers" if x.is_cuda and xformers_available() else "sdpa"
        return self._backend

    def _attend(self, qkv: Tensor, backend: str, attn_mask: Tensor | None = None) -> Tensor:
        """``qkv [B, N, 3, H, hd]`` -> attended values ``[B, N, H * hd]`` with the chosen kernel."""
        B, N, _, H, hd = qkv.shape
        drop = self.attn_drop if self.training else 0.0
        if backend == "xformers" and attn_mask is None:
            q, k, v = qkv.unbind(2)  # xformers wants B x N x H x hd
            out = _xformers_ops().memory_efficient_attention(q, k, v, p=drop, scale=self.scale)
            return out.reshape(B, N, H * hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B x H x N x hd
        if backend == "math":
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if attn_mask is not None:
                attn = (
                    attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
                )
            attn = F.dropout(attn.softmax(dim=-1), p=drop)
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        return out.transpose(1, 2).reshape(B, N, H * hd)

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, seq_shapes: Sequence[tuple[int, int]] | None = None
    ) -> Tensor:
        """Attention over ``x [B, N, D]``, or over several token sets packed as ``x [sum_i B_i * N_i, D]``.

        With ``seq_shapes = [(B_0, N_0), (B_1, N_1), ...]`` the rows of ``x`` are the token sets flattened one after
        the other; ``qkv`` and ``proj`` then run once over all rows (one parameter gather under ZeRO-3) and only the
        attention itself runs per set, so tokens never attend across sets or samples. Each set uses the same kernel
        call as the unpacked path (no block-diagonal mask), so packed and unpacked results agree to rounding.
        Returns the same layout as ``x``.
        """
        backend = self._resolve_backend(x)
        D = x.shape[-1]
        H = self.num_heads
        if seq_shapes is None:
            B, N, _ = x.shape
            out = self._attend(self.qkv(x).reshape(B, N, 3, H, D // H), backend, attn_mask)
        else:
            if attn_mask is not None:
                raise ValueError("attn_mask is not supported with packed token sets (seq_shapes)")
            if x.ndim != 2 or x.shape[0] != sum(b * n for b, n in seq_shapes):
                raise ValueError(f"packed tokens {tuple(x.shape)} do not match seq_shapes {list(seq_shapes)}")
            qkv = self.qkv(x).split([b * n for b, n in seq_shapes])  # contiguous row ranges: views, no copy
            out = torch.cat(
                [
                    self._attend(t.reshape(b, n, 3, H, D // H), backend).reshape(b * n, D)
                    for t, (b, n) in zip(qkv, seq_shapes, strict=True)
                ]
            )
        return self.proj_drop(self.proj(out))
