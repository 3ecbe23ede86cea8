"""TinyViT image encoder of MobileSAM / LiteMedSAM: conv stem + MBConv stage, windowed-attention stages, neck.

State-dict keys equal MobileSAM's / LiteMedSAM's (`patch_embed.seq.0.c.weight`, `layers.N.blocks.M...`,
`neck...`), so their checkpoints load with strict=True and ours load back into their code.

Speed on CPU (where LiteMedSAM users fine-tune) comes from what the reference does not do: channels-last
activations for oneDNN's convolutions; BatchNorm with frozen statistics folded into its convolution on the
fly (one pass over the large stage-0 maps instead of two, no saved BN input for backward); attention
through `scaled_dot_product_attention` with the LeViT bias as an additive mask; and the depthwise
convolutions between attention and MLP reading the token grid as a channels-last view, without a copy.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from sam_train.models.common import LayerNorm2d, LayerNormFp32
from sam_train.models.image_encoder import window_partition, window_unpartition


class ConvBN(nn.Module):
    """Conv2d without bias + BatchNorm2d (keys `c.*`, `bn.*`). [B, Ci, H, W] -> [B, Co, H', W'].

    In eval mode, or always with `freeze_stats` (set by TinyViT), the BatchNorm uses its running
    statistics and is folded into the kernel: exact up to rounding, and weight, gamma and beta still
    train through autograd. A flag rather than the BN's train/eval mode, because trainers (Lightning)
    restore every submodule's mode on their own.
    """

    def __init__(
        self, in_chans: int, out_chans: int, kernel: int = 1, stride: int = 1, groups: int = 1, bn_weight_init=1.0
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(in_chans, out_chans, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)
        self.freeze_stats = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn.training and not self.freeze_stats:
            return self.bn(self.c(x))
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        weight = self.c.weight * scale.reshape(-1, 1, 1, 1)
        if self.c.kernel_size == (1, 1) and self.c.stride == (1, 1) and self.c.groups == 1:
            # A 1x1 conv is a matmul over channels: on the channels-last map, GEMM's backward is ~1.4x
            # faster than oneDNN's convolution backward on CPU, and both permutes are views.
            out = F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), shift)
            return out.permute(0, 3, 1, 2)
        return F.conv2d(x, weight, shift, self.c.stride, self.c.padding, self.c.dilation, self.c.groups)


class PatchEmbed(nn.Module):
    """Stem: two ConvBN with GELU between. [B, 3, S, S] -> [B, D, S/stride, S/stride].

    stride 4 = MobileSAM (3x3 convs of stride 2); stride 1 = LiteMedSAM (1x1 convs at full resolution).
    """

    def __init__(self, in_chans: int, embed_dim: int, stride: int) -> None:
        super().__init__()
        if stride not in (1, 4):
            raise ValueError(f"TinyViT stem stride must be 1 (LiteMedSAM) or 4 (MobileSAM), got {stride}")
        kernel, step = (3, 2) if stride == 4 else (1, 1)
        self.seq = nn.Sequential(
            ConvBN(in_chans, embed_dim // 2, kernel, step), nn.GELU(), ConvBN(embed_dim // 2, embed_dim, kernel, step)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project (+ residual). [B, C, H, W] -> same."""

    def __init__(self, dim: int, expand_ratio: float, drop_path: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.act1 = nn.GELU()
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = ConvBN(hidden, dim, bn_weight_init=0.0)  # residual branch starts at zero
        self.act3 = nn.GELU()
        self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))
        return self.act3(x + self.drop_path(y))


class PatchMerging(nn.Module):
    """Downsampling between stages: 1x1, 3x3 depthwise (stride), 1x1. -> tokens [B, H'*W', out_dim].

    Input: [B, C, H, W] after the conv stage, or tokens [B, H*W, C] with the grid `resolution`.
    """

    def __init__(self, resolution: tuple[int, int], dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.act = nn.GELU()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            h, w = self.resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        return x.flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """LeViT-style windowed attention with a learned bias per (head, |dy|, |dx|) offset. [B, N, C] -> same.

    The fused `qkv` projection is laid out per head as [q_h, k_h, v_h] (MobileSAM's layout); `qkv_rows`
    tells LoRA which rows belong to q, k or v.
    """

    def __init__(self, dim: int, num_heads: int, resolution: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.norm = LayerNormFp32(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        points = list(itertools.product(range(resolution[0]), range(resolution[1])))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer("attention_bias_idxs", torch.tensor(idxs).view(len(points), -1), persistent=False)
        self.attention_bias_idxs: torch.Tensor

    def qkv_rows(self, part: str) -> torch.Tensor:
        """Row indices of `qkv.weight` that produce q, k or v (part in 'q', 'k', 'v')."""
        d = self.key_dim
        offset = "qkv".index(part) * d
        return torch.cat([torch.arange(h * 3 * d + offset, h * 3 * d + offset + d) for h in range(self.num_heads)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.key_dim).transpose(1, 2)
        q, k, v = qkv.split(self.key_dim, dim=-1)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    """Pre-norm feed-forward (keys `norm`, `fc1`, `fc2`). [..., C] -> [..., C]."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = LayerNormFp32(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention, 3x3 depthwise conv on the grid, MLP. Tokens [B, H*W, C] -> same.

    `attn_adapter` / `mlp_adapter` are the bottleneck-adapter slots shared with the ViT blocks
    (nn.Identity, parameter-free, by default).
    """

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, (window_size, window_size))
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, local_conv_size, groups=dim)
        self.drop_path = StochasticDepth(drop_path, mode="row")
        self.attn_adapter: nn.Module = nn.Identity()
        self.mlp_adapter: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        b, n, c = x.shape
        # Zero padding before the attention's own norm, as MobileSAM: padded tokens take part as keys.
        windows, pad_hw = window_partition(x.view(b, h, w, c), self.window_size)
        attn = self.attn(windows.view(-1, self.window_size**2, c))
        attn = window_unpartition(attn.view_as(windows), self.window_size, pad_hw, (h, w)).view(b, n, c)
        x = x + self.drop_path(self.attn_adapter(attn))
        # [B, H, W, C] permuted to NCHW is a channels-last view: the depthwise conv needs no copy.
        x = self.local_conv(x.view(b, h, w, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, n, c)
        return x + self.drop_path(self.mlp_adapter(self.mlp(x)))


class Stage(nn.Module):
    """One stage: MBConv blocks (stage 0, on [B, C, H, W]) or TinyViT blocks (on tokens), then the
    downsampling to the next stage (none after the last). Output: tokens [B, H'*W', C']."""

    def __init__(self, blocks: list[nn.Module], downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class TinyViT(nn.Module):
    """TinyViT image encoder as MobileSAM uses it. [B, 3, S, S] -> [B, out_chans, S/(4 stem), S/(4 stem)].

    Args:
        img_size: input side S.
        in_chans: input channels.
        embed_dims, depths, num_heads, window_sizes: per stage (stage 0 is convolutional: its heads and
            window are unused).
        mlp_ratio: MLP width / stage width.
        mbconv_expand_ratio: hidden width of the stage-0 MBConv blocks / stage width.
        local_conv_size: kernel of the depthwise conv between attention and MLP.
        stem_stride: 4 (MobileSAM, 1024 px input) or 1 (LiteMedSAM, 256 px input); both give 64 x 64
            embeddings at their input size.
        downsample_strides: stride of the downsampling after stages 0, 1, 2 (MobileSAM keeps the last
            two stages at one resolution: (2, 2, 1)).
        out_chans: neck output (the prompt embedding width).
        drop_path_rate: stochastic depth, linearly increasing over all blocks up to this rate.
        freeze_bn_stats: keep every BatchNorm on its running statistics in training too (the default:
            fine-tuning batches of a few images give useless batch statistics); affine BN weights still train.
        grad_checkpointing: recompute each block's activations in backward to save memory.
    """

    def __init__(
        self,
        *,
        img_size: int = 1024,
        in_chans: int = 3,
        embed_dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: tuple[int, ...] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        stem_stride: int = 4,
        downsample_strides: tuple[int, ...] = (2, 2, 1),
        out_chans: int = 256,
        drop_path_rate: float = 0.0,
        freeze_bn_stats: bool = True,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        n_stages = len(depths)
        if not (len(embed_dims) == len(num_heads) == len(window_sizes) == n_stages == len(downsample_strides) + 1):
            raise ValueError("TinyViT: embed_dims, depths, num_heads, window_sizes need one entry per stage, "
                             "downsample_strides one fewer")
        self.img_size = img_size
        self.depths = tuple(depths)
        self.freeze_bn_stats = freeze_bn_stats
        self.grad_checkpointing = grad_checkpointing
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], stem_stride)
        side = img_size // stem_stride
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i in range(n_stages):
            dim, res = embed_dims[i], (side, side)
            block_rates = rates[sum(depths[:i]) : sum(depths[: i + 1])]
            down = None
            if i < n_stages - 1:
                down = PatchMerging(res, dim, embed_dims[i + 1], downsample_strides[i])
                side = (side - 1) // downsample_strides[i] + 1
            if i == 0:
                blocks: list[nn.Module] = [MBConv(dim, mbconv_expand_ratio, r) for r in block_rates]
            else:
                blocks = [
                    TinyViTBlock(dim, res, num_heads[i], window_sizes[i], mlp_ratio, local_conv_size, r)
                    for r in block_rates
                ]
            self.layers.append(Stage(blocks, down))
        self.embed_size = side
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.apply(_init_weights)
        for m in self.modules():
            if isinstance(m, ConvBN):
                m.freeze_stats = freeze_bn_stats

    @property
    def num_lr_layers(self) -> int:
        """Layer-wise lr decay: a parameter gets decay ** (num_lr_layers - layer_id(name))."""
        return sum(self.depths)

    def layer_id(self, param_name: str) -> int:
        """TinyViT's own decay order: the stem shares the first block's id, a downsampling the id of the
        block before it, the last block and the neck get scale 1 (MobileSAM's `set_layer_lr_decay`)."""
        parts = param_name.split(".")
        if parts[0] == "patch_embed":
            return 1
        if parts[0] != "layers":
            return self.num_lr_layers
        stage = int(parts[1])
        before = sum(self.depths[:stage])
        if parts[2] == "blocks":
            return before + int(parts[3]) + 1
        return before + self.depths[stage]  # downsample

    # ----------------------------------------------------------------- split forward
    # The encoder is a chain of units: the stem, every block and every downsampling, in order (then the
    # neck). `forward_until(x, k)` runs units [0, k) and `forward_from(f, k)` the rest: a fine-tune that
    # trains only the last units caches `forward_until` once and runs `forward_from` every step.
    def units(self) -> list[tuple[str, nn.Module]]:
        """(state-dict prefix, module) of each unit in forward order (the neck is not a unit)."""
        out: list[tuple[str, nn.Module]] = [("patch_embed", self.patch_embed)]
        for i, stage in enumerate(self.layers):
            out += [(f"layers.{i}.blocks.{j}", block) for j, block in enumerate(stage.blocks)]
            if stage.downsample is not None:
                out.append((f"layers.{i}.downsample", stage.downsample))
        return out

    def unit_of(self, name: str) -> int:
        """Index of the unit a parameter / buffer name belongs to; the neck is len(units())."""
        for k, (prefix, _) in enumerate(self.units()):
            if name.startswith(prefix + "."):
                return k
        if name.startswith("neck."):
            return len(self.units())
        raise ValueError(f"TinyViT.unit_of: {name!r} is not a parameter of this encoder")

    def _run(self, fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        blocks = (MBConv, TinyViTBlock)  # the stem and downsamplings keep their activations
        if self.grad_checkpointing and self.training and torch.is_grad_enabled() and isinstance(fn, blocks):
            return checkpoint(fn, x, use_reentrant=False)
        return fn(x)

    @staticmethod
    def _grid(x: torch.Tensor) -> torch.Tensor:
        """Tokens [B, h*w, C] -> [B, C, h, w] (a channels-last view); a map passes through."""
        if x.ndim == 4:
            return x
        b, n, c = x.shape
        side = math.isqrt(n)
        return x.reshape(b, side, side, c).permute(0, 3, 1, 2)

    def forward_until(self, x: torch.Tensor, unit: int) -> torch.Tensor:
        """[B, 3, S, S] normalised images -> [B, C_k, h_k, w_k] input of unit `unit` (channels-last)."""
        # Channels-last makes oneDNN's convolutions (and above all their backward) 2-3x faster on CPU
        # at stage 0's 256 x 256 maps, and stage 0's output then flattens into tokens without a copy.
        x = x.contiguous(memory_format=torch.channels_last)
        for _, module in self.units()[:unit]:
            x = self._run(module, x)
        return self._grid(x)

    def forward_from(self, x: torch.Tensor, unit: int) -> torch.Tensor:
        """[B, C_k, h_k, w_k] input of unit `unit` (from `forward_until`) -> [B, out_chans, h, w] embeddings."""
        x = x.contiguous(memory_format=torch.channels_last)
        for _, module in self.units()[unit:]:
            if isinstance(module, TinyViTBlock) and x.ndim == 4:
                x = x.permute(0, 2, 3, 1).flatten(1, 2)  # channels-last map -> tokens, a view
            x = self._run(module, x)
        return self.neck(self._grid(x)).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(x, 0)


def _init_weights(m: nn.Module) -> None:
    # MobileSAM's init: truncated-normal linear weights, zero biases (convs keep torch's default).
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
