"""SAM's ViT image encoder: windowed + global attention, decomposed relative positions, conv neck."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from sam_train.models.common import LayerNorm2d, LayerNormFp32, MLPBlock


class PatchEmbed(nn.Module):
    """Image to patch embedding: [B, C, H, W] -> [B, H/p, W/p, D]."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative position embeddings for every (query, key) pair along one axis.

    Args:
        q_size, k_size: query and key lengths along the axis.
        rel_pos: [L, C] table; linearly resized when L != 2 * max(q_size, k_size) - 1.
    Returns:
        [q_size, k_size, C]
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear"
        )
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Additive attention bias of MViTv2-style decomposed relative positions.

    Args:
        q: [B, heads, H*W, C] unscaled queries.
        rel_pos_h, rel_pos_w: relative position tables of the two axes.
        size: (H, W) of the token grid (queries and keys share it).
    Returns:
        [B, heads, H*W, H*W] bias to add to the attention logits.
    """
    h, w = size
    rh = get_rel_pos(h, h, rel_pos_h).to(q.dtype)
    rw = get_rel_pos(w, w, rel_pos_w).to(q.dtype)
    b, n, _, c = q.shape
    r_q = q.reshape(b, n, h, w, c)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)
    bias = rel_h[..., :, None] + rel_w[..., None, :]
    return bias.reshape(b, n, h * w, h * w)


class Attention(nn.Module):
    """Multi-head self-attention over a [B, H, W, D] grid with optional relative positions.

    Uses `scaled_dot_product_attention` (flash / memory-efficient kernels on GPU); the relative
    positions enter as an additive bias. `use_sdpa=False` keeps the explicit softmax path as a
    reference for tests.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        input_size: tuple[int, int] | None = None,
        use_sdpa: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        self.use_sdpa = use_sdpa
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required when use_rel_pos=True")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
                nn.init.trunc_normal_(self.rel_pos_w, std=0.02)

    def qkv_rows(self, part: str) -> torch.Tensor:
        """Row indices of `qkv.weight` that produce q, k or v: the official layout is [Q; K; V]."""
        dim = self.qkv.in_features
        start = "qkv".index(part) * dim
        return torch.arange(start, start + dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        # [3, B, heads, H*W, C]
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w)) if self.use_rel_pos else None
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            out = attn.softmax(dim=-1) @ v
        out = out.permute(0, 2, 1, 3).reshape(b, h, w, -1)
        return self.proj(out)


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, H, W, C] -> ([B * nW, ws, ws, C], padded (Hp, Wp)); pads bottom/right with zeros."""
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of `window_partition`: [B * nW, ws, ws, C] -> [B, H, W, C] without padding."""
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // (hp * wp // window_size // window_size)
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :].contiguous()


class Block(nn.Module):
    """Pre-norm transformer block with windowed (window_size > 0) or global attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        input_size: tuple[int, int] | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size
        self.drop_path = StochasticDepth(drop_path, mode="row")
        # Hooks for bottleneck adapters (sam_train.finetune.adapters); parameter-free by default, so
        # the state dict stays the official one.
        self.attn_adapter: nn.Module = nn.Identity()
        self.mlp_adapter: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        else:
            x = self.attn(x)
        x = shortcut + self.drop_path(self.attn_adapter(x))
        return x + self.drop_path(self.mlp_adapter(self.mlp(self.norm2(x))))


class ImageEncoderViT(nn.Module):
    """SAM's image encoder. [B, 3, S, S] normalised images -> [B, out_chans, S/p, S/p] embeddings.

    Args:
        img_size: input side S (images are padded to S x S).
        patch_size: patch side p.
        in_chans: input channels.
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: ViT width, depth, heads, MLP ratio, bias.
        out_chans: channels of the neck output (the prompt embedding width).
        norm_layer, act_layer: layer types of the blocks.
        use_abs_pos: learned absolute position embedding on the patch grid.
        use_rel_pos, rel_pos_zero_init: decomposed relative positions and their init.
        window_size: attention window of the non-global blocks.
        global_attn_indexes: blocks that use global attention.
        drop_path_rate: stochastic depth, linearly increasing with depth up to this rate.
        grad_checkpointing: recompute each block's activations in backward to save memory.
    """

    def __init__(
        self,
        *,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = partial(LayerNormFp32, eps=1e-6),  # type: ignore[assignment]  # noqa: B008
        act_layer: type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        rel_pos_zero_init: bool = True,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.depth = depth
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.pos_embed: nn.Parameter | None = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=norm_layer,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                rel_pos_zero_init=rel_pos_zero_init,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
                drop_path=drop_path_rate * i / max(depth - 1, 1),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.grad_checkpointing = grad_checkpointing

    # Split forward (as `TinyViT`): units are the patch embedding (with the position embedding) and each
    # block; `forward_until(x, k)` runs units [0, k) -> [B, C, h, w], `forward_from(f, k)` the rest + neck.
    def units(self) -> list[tuple[str, nn.Module]]:
        """(state-dict prefix, module) of each unit in forward order (the neck is not a unit)."""
        return [("patch_embed", self.patch_embed)] + [(f"blocks.{i}", blk) for i, blk in enumerate(self.blocks)]

    def unit_of(self, name: str) -> int:
        """Index of the unit a parameter / buffer name belongs to; the neck is len(units())."""
        if name.startswith(("patch_embed.", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        if name.startswith("neck."):
            return self.depth + 1
        raise ValueError(f"ImageEncoderViT.unit_of: {name!r} is not a parameter of this encoder")

    def _run_blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Units [start, stop) on [B, 3, S, S] images (start 0) or [B, h, w, C] tokens -> [B, h, w, C]."""
        if start == 0 and stop > 0:
            x = self.patch_embed(x)
            if self.pos_embed is not None:
                x = x + self.pos_embed
        for blk in self.blocks[max(start - 1, 0) : max(stop - 1, 0)]:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward_until(self, x: torch.Tensor, unit: int) -> torch.Tensor:
        """[B, 3, S, S] normalised images -> [B, C, h, w] input of unit `unit` (the images for unit 0)."""
        return x if unit == 0 else self._run_blocks(x, 0, unit).permute(0, 3, 1, 2)

    def forward_from(self, x: torch.Tensor, unit: int) -> torch.Tensor:
        """[B, C, h, w] input of unit `unit` (from `forward_until`) -> [B, out_chans, h, w] embeddings."""
        x = x if unit == 0 else x.permute(0, 2, 3, 1)
        return self.neck(self._run_blocks(x, unit, self.depth + 1).permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(x, 0)

    @property
    def num_lr_layers(self) -> int:
        """Layer-wise lr decay: a parameter gets decay ** (num_lr_layers - layer_id(name))."""
        return self.depth + 1

    def layer_id(self, param_name: str) -> int:
        """Depth index of a parameter for layer-wise lr decay: 0 = patch/pos embedding, depth+1 = neck."""
        if param_name.startswith(("patch_embed", "pos_embed")):
            return 0
        if param_name.startswith("blocks."):
            return int(param_name.split(".")[1]) + 1
        return self.depth + 1
