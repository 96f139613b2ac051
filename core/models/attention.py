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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_BACKENDS = ("auto", "sdpa", "math", "xformers")


@functools.lru_cache(maxsize=1)
def _xformers_ops():  # noqa: ANN202 - optional module
    try:
        import xformers.ops as xops
    except Exception:  # ImportError, or a broken binary build for this torch
        return None
    return xops


def xformers_available() -> bool:
    return _xformers_ops() is not None


class Attention(nn.Module):
    """Self-attention over tokens ``x [B, N, D]`` with ``num_heads`` heads of size ``D / num_heads``."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, backend: str = "auto") -> None:
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
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {value!r}; choose one of {ATTENTION_BACKENDS}")
        self._backend = value

    def _resolve_backend(self, x: Tensor) -> str:
        if self._backend in ("auto", "xformers"):
            return "xformers" if x.is_cuda and xformers_available() else "sdpa"
        return self._backend

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        B, N, D = x.shape
        H = self.num_heads
        qkv = self.qkv(x).reshape(B, N, 3, H, D // H)  # B x N x 3 x H x hd
        backend = self._resolve_backend(x)
        drop = self.attn_drop if self.training else 0.0
        if backend == "xformers" and attn_mask is None:
            q, k, v = qkv.unbind(2)  # xformers wants B x N x H x hd
            out = _xformers_ops().memory_efficient_attention(q, k, v, p=drop, scale=self.scale)
            out = out.reshape(B, N, D)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B x H x N x hd
            if backend == "math":
                attn = (q * self.scale) @ k.transpose(-2, -1)
                if attn_mask is not None:
                    attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                        else attn + attn_mask
                attn = F.dropout(attn.softmax(dim=-1), p=drop)
                out = attn @ v
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
            out = out.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(out))
