"""Absolute position embeddings: fixed 2D sin-cos tables (MAE) and bicubic resampling of learned grids."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def get_1d_sincos_pos_embed(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Transformer sin-cos encoding of 1D positions.

    Args:
        embed_dim: output width D (even).
        positions: [M] positions (any float values).
    Returns:
        [M, D] float64: first D/2 channels sin(pos * w_k), last D/2 cos(pos * w_k), w_k = 10000^(-2k/D).
    """
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.double().reshape(-1)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding of a patch grid, in MAE's layout (row-major tokens).

    Channel order follows the official MAE tables (so their checkpoints' fixed tables agree with
    ours): the first D/2 channels encode the column (x) index, the last D/2 the row (y) index.

    Args:
        embed_dim: width D (divisible by 4).
        grid_size: grid side, or (rows, cols).
        cls_token: prepend an all-zero row for the class token.
    Returns:
        [rows * cols (+1), D] float32.
    """
    if embed_dim % 4:
        raise ValueError(f"2D sin-cos embedding width must be divisible by 4, got {embed_dim}")
    rows, cols = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    yy, xx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    emb = torch.cat(
        [
            get_1d_sincos_pos_embed(embed_dim // 2, xx.reshape(-1)),
            get_1d_sincos_pos_embed(embed_dim // 2, yy.reshape(-1)),
        ],
        dim=1,
    )
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def interpolate_pos_embed_grid(pos: torch.Tensor, new_hw: tuple[int, int] | int) -> torch.Tensor:
    """Bicubic resampling of an absolute position embedding to another patch grid.

    Two layouts are accepted and returned unchanged in kind:
      - grid [1, h, w, C] (SAM's image encoder) -> [1, H, W, C];
      - sequence [1, P + h*w, C] with a square grid and P in {0, 1} prefix (class) tokens
        (timm / MAE) -> [1, P + H*W, C]; prefix tokens are kept as they are.
    Interpolation is done in fp32 with `align_corners=False` and no antialiasing (as MAE/DeiT do).
    """
    new_h, new_w = (new_hw, new_hw) if isinstance(new_hw, int) else new_hw
    if pos.dim() == 4:
        if pos.shape[0] != 1:
            raise ValueError(f"position grid must be [1, h, w, C], got {tuple(pos.shape)}")
        return _resize_grid(pos, (new_h, new_w))
    if pos.dim() != 3 or pos.shape[0] != 1:
        raise ValueError(f"position embedding must be [1, h, w, C] or [1, N, C], got {tuple(pos.shape)}")
    n = pos.shape[1]
    for prefix in (0, 1):
        side = math.isqrt(n - prefix)
        if side * side == n - prefix and side > 0:
            break
    else:
        raise ValueError(f"position sequence of {n} tokens is not a square grid (with or without a class token)")
    prefix_tokens, grid = pos[:, :prefix], pos[:, prefix:].reshape(1, side, side, -1)
    resized = _resize_grid(grid, (new_h, new_w)).reshape(1, new_h * new_w, -1)
    return torch.cat([prefix_tokens, resized], dim=1)


def _resize_grid(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[1, h, w, C] -> [1, H, W, C] bicubic, computed in fp32, returned in the input dtype."""
    if tuple(grid.shape[1:3]) == tuple(size):
        return grid.clone()
    out = F.interpolate(grid.permute(0, 3, 1, 2).float(), size=size, mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).to(grid.dtype)
