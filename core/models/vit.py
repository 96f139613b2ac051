"""DINOv2 Vision Transformer, numerically identical to the official ``DinoVisionTransformer``.

Reference: Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision" (arXiv:2304.07193), and the
official implementation facebookresearch/dinov2 ``dinov2/models/vision_transformer.py``. Registers: Darcet et al.,
"Vision Transformers Need Registers" (arXiv:2309.16588). Bag-of-channels (``channel_adaptive``): Channel-Adaptive
DINO / Cell-DINO (facebookresearch/dinov2 PR #575).

The constructor takes the official keyword names, so the ``config`` dict of an official model maps onto it
one-to-one; state-dict keys are hub-style (``blocks.{i}.…``) whatever ``block_chunks`` says.

Like the official model, ``forward_features`` also takes a list of crop batches (DINOv2 feeds the global and the
local crops of a step as one list). Here the list is packed into one token matrix, so the patch embedding, every
block sub-module and the final norm run once for the whole list (see :mod:`core.models.block`): under ZeRO-3 each
parameter is gathered once per forward and once per backward, not once per crop set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.models.block import Block, pack_tokens, unpack_tokens
from core.models.ffn import FFN_LAYERS


class PatchEmbed(nn.Module):
    """Non-overlapping patches: ``[B, C, H, W] -> [B, H/p * W/p, D]`` (row-major patch order).

    A list of images (any sizes, same channels) gives the list of token tensors from a single ``proj`` call.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def _grid(self, x: Tensor) -> tuple[int, int]:
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {p}; crop or pad it first")
        return H // p, W // p

    def forward(self, x: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        """``x [B, C, H, W] -> [B, H/p * W/p, D]``; a list of images gives a list (one ``proj`` call)."""
        if isinstance(x, (list, tuple)):
            return self._forward_many(x)
        self._grid(x)
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))

    def _forward_many(self, xs: Sequence[Tensor]) -> list[Tensor]:
        # A stride-p, kernel-p conv sees each patch on its own, so every patch of every image can be a p x p image
        # of its own: one proj call for crops of different sizes, with the values of the whole-image conv.
        p = self.patch_size
        patches, shapes = [], []
        for x in xs:
            h, w = self._grid(x)
            B, C = x.shape[:2]
            patches.append(x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B * h * w, C, p, p))
            shapes.append((B, h * w))
        rows = self.norm(self.proj(torch.cat(patches)).flatten(1))  # [sum_i B_i * N_i, D], row-major patches
        return unpack_tokens(rows, shapes)


class VisionTransformer(nn.Module):
    """DINOv2 ViT. All arguments are the official ``DinoVisionTransformer`` keywords, plus:

    Args:
        interpolate_align_corners: resize the positional table with ``size=`` and ``align_corners=True``, the rule of
            Meta's HighResCanopyHeight backbone, instead of DINOv2's rules.
        attn_backend: ``auto`` | ``sdpa`` | ``math`` | ``xformers`` (see :mod:`core.models.attention`).
        block_fn, act_layer: accepted for signature compatibility; ``act_layer`` is used, ``block_fn`` must be None.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        embed_layer: object = None,
        act_layer: type[nn.Module] = nn.GELU,
        block_fn: object = None,
        ffn_layer: str = "mlp",
        block_chunks: int = 1,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        channel_adaptive: bool = False,
        interpolate_align_corners: bool = False,
        attn_backend: str = "auto",
    ) -> None:
        super().__init__()
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; choose one of {sorted(FFN_LAYERS)}")
        if embed_layer is not None or block_fn is not None:
            raise ValueError("custom embed_layer/block_fn are not supported; use the keyword arguments instead")
        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.interpolate_align_corners = interpolate_align_corners
        self.bag_of_channels = channel_adaptive
        self.block_chunks = block_chunks  # accepted for compatibility; keys stay hub-style

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        rates = (
            [drop_path_rate] * depth
            if drop_path_uniform
            else torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        )
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=rates[i],
                init_values=init_values,
                act_layer=act_layer,
                ffn_layer=FFN_LAYERS[ffn_layer],
                attn_backend=attn_backend,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    # ----------------------------------------------------------------------------------------------- set-up
    def init_weights(self) -> None:
        """Official initialisation: trunc-normal(0.02) pos-embed and linears, tiny cls/register tokens."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_attention_backend(self, backend: str) -> None:
        """Use attention kernel ``backend`` (see :data:`~core.models.attention.ATTENTION_BACKENDS`) in every block."""
        for block in self.blocks:
            block.attn.backend = backend

    # ----------------------------------------------------------------------------------------------- tokens
    def interpolate_pos_encoding(self, x: Tensor, w: int, h: int) -> Tensor:
        """Positional table for tokens ``x [B, 1+N, D]`` of an image of ``w`` rows by ``h`` columns (pixels).

        The argument names follow the official code, where ``w`` is the image height. Returned shape ``[1, 1+N, D]``.
        """
        previous_dtype = x.dtype
        npatch = x.shape[1] - 1
        n_table = self.pos_embed.shape[1] - 1
        if npatch == n_table and w == h:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        class_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
        dim = x.shape[-1]
        rows, cols = w // self.patch_size, h // self.patch_size
        m = int(math.sqrt(n_table))
        if m * m != n_table:
            raise ValueError(f"pos_embed has {n_table} patch rows, not a square grid")
        grid = patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2)  # 1 x D x M x M
        if self.interpolate_align_corners:
            grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=True)
        elif self.interpolate_offset:
            # DINOv2 rule: the +offset scale factor also drives the coordinate mapping, so it differs from size=.
            scale = ((rows + self.interpolate_offset) / m, (cols + self.interpolate_offset) / m)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=self.interpolate_antialias)
        else:
            grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=self.interpolate_antialias)
        if tuple(grid.shape[-2:]) != (rows, cols):
            raise RuntimeError(f"pos-embed interpolation gave {tuple(grid.shape[-2:])}, expected {(rows, cols)}")
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
        return torch.cat((class_pos, patch_pos), dim=1).to(previous_dtype)

    def prepare_tokens_with_masks(
        self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> Tensor | list[Tensor]:
        """``x [B, C, H, W]`` -> ``[B, 1+R+N, D]``; masked patches (``masks [B, N]`` bool) become the mask token.

        For a list of images (``masks`` None or a list of the same length, entries a mask or None), the list of
        token tensors, with one patch-embedding call for all of them.
        """
        if isinstance(x, (list, tuple)):
            masks_list = self._masks_list(x, masks)
            patches = self.patch_embed(x)
            return [self._finish_tokens(t, m, *xi.shape[-2:]) for t, m, xi in zip(patches, masks_list, x, strict=True)]
        return self._finish_tokens(self.patch_embed(x), masks, *x.shape[-2:])

    @staticmethod
    def _masks_list(x: Sequence[Tensor], masks: Sequence[Tensor | None] | None) -> list[Tensor | None]:
        if not x:
            raise ValueError("forward over a list of crops needs at least one crop tensor")
        if masks is None:
            return [None] * len(x)
        if isinstance(masks, Tensor) or len(masks) != len(x):
            raise ValueError(
                f"with a list of {len(x)} inputs, masks must be None or a list of {len(x)} entries "
                "(a [B_i, N_i] bool tensor or None each)"
            )
        return list(masks)

    def _finish_tokens(self, x: Tensor, masks: Tensor | None, w: int, h: int) -> Tensor:
        """Patch tokens ``x [B, N, D]`` of a ``w`` x ``h`` image -> mask token, class token, positions, registers."""
        B = x.shape[0]
        if masks is not None:
            # Masking precedes the positional embedding, so masked slots keep their position.
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        if self.register_tokens is not None:
            # Registers are inserted after the positional embedding: they never get one.
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]), dim=1)
        return x

    # ----------------------------------------------------------------------------------------------- outputs
    def _split_outputs(self, x: Tensor, masks: Tensor | None, x_norm: Tensor | None = None) -> dict[str, Tensor | None]:
        x_norm = self.norm(x) if x_norm is None else x_norm
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features(
        self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> dict | list[dict]:
        """Token outputs as a dict, or a list of dicts for a list of inputs (e.g. the global and local crops).

        A list ``[x_i [B_i, C, H_i, W_i]]`` (any batch sizes and sizes) takes ``masks`` None or a list of the same
        length (``[B_i, N_i]`` bool or None each). Its elements are computed together, each module called once
        (see the module docstring), with the results of calling the model on each element alone.
        """
        if isinstance(x, (list, tuple)):
            masks_list = self._masks_list(x, masks)
            rows, shapes = pack_tokens(self.prepare_tokens_with_masks(x, masks_list))
            for blk in self.blocks:
                rows = blk(rows, seq_shapes=shapes)
            normed = unpack_tokens(self.norm(rows), shapes)
            return [
                self._split_outputs(t, m, x_norm=n)
                for t, n, m in zip(unpack_tokens(rows, shapes), normed, masks_list, strict=True)
            ]
        tokens = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self._split_outputs(tokens, masks)

    def forward(
        self,
        x: Tensor | Sequence[Tensor],
        masks: Tensor | Sequence[Tensor | None] | None = None,
        is_training: bool = False,
    ) -> Tensor | dict | list:
        """``head(class token)``; with ``is_training`` the :meth:`forward_features` output (a list for a list)."""
        ret = self.forward_features(x, masks)
        if is_training:
            return ret
        if isinstance(ret, list):
            return [self.head(r["x_norm_clstoken"]) for r in ret]
        return self.head(ret["x_norm_clstoken"])

    def _collect_blocks(self, x: Tensor, n: int | Sequence[int]) -> list[Tensor]:
        depth = len(self.blocks)
        wanted = set(range(depth - n, depth)) if isinstance(n, int) else set(n)
        if not wanted or min(wanted) < 0 or max(wanted) >= depth:
            raise ValueError(f"block indices {sorted(wanted)} out of range for depth {depth}")
        x = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in wanted:
                outputs.append(x)
        return outputs

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last ``n`` blocks (int) or of the listed block indices, in block order.

        Each item is patch tokens ``[B, N, D]`` (``[B, D, H/p, W/p]`` with ``reshape``), paired with the class token
        ``[B, D]`` when ``return_class_token``. In bag-of-channels mode (``channel_adaptive``) every channel of
        ``x [B, C, H, W]`` is encoded on its own: patches are ``[B, C, N, D]`` (``[B, C, D, H/p, W/p]`` with
        ``reshape``) and the class token is ``[B, C*D]``, channels concatenated in input order. Unlike the official
        code, ``return_class_token`` and ``reshape`` are honoured in that mode too.
        """
        B, C, H, W = x.shape
        if self.bag_of_channels:
            x = x.reshape(B * C, 1, H, W)
        outputs = self._collect_blocks(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        cls_tokens = [out[:, 0] for out in outputs]
        patches = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        h, w = H // self.patch_size, W // self.patch_size
        if self.bag_of_channels:
            cls_tokens = [c.reshape(B, C * c.shape[-1]) for c in cls_tokens]
            patches = [p.reshape(B, C, h * w, -1) for p in patches]
            if reshape:
                patches = [p.reshape(B, C, h, w, -1).permute(0, 1, 4, 2, 3).contiguous() for p in patches]
        elif reshape:
            patches = [p.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, cls_tokens, strict=True))
        return tuple(patches)
