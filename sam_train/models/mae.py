"""Masked autoencoder (He et al.) on the SAM image encoder's ViT blocks, for encoder pretraining.

Parameter names follow the official MAE / timm VisionTransformer layout (`patch_embed.proj`,
`cls_token`, `pos_embed`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp}`, `norm`, `decoder_*`),
except that our MLP layers are `mlp.lin1/lin2` (SAM's names) where timm has `mlp.fc1/fc2`; so a
timm or official MAE state dict loads after one rename (`load_timm_state_dict`), and the blocks
export into SAM's image encoder without renaming (`sam_train.export.mae_to_sam`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sam_train.models.common import LayerNormFp32
from sam_train.models.image_encoder import Block, PatchEmbed
from sam_train.models.pos_embed import get_2d_sincos_pos_embed


def num_masked_patches(num_patches: int, mask_ratio: float) -> int:
    """Patches hidden per sample: round(mask_ratio * num_patches), halves rounded up."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return min(int(mask_ratio * num_patches + 0.5), num_patches - 1)


def random_masking(
    x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by shuffling the tokens with uniform noise and keeping a prefix.

    Args:
        x: [B, N, D] tokens.
        mask_ratio: fraction of tokens to hide (round(ratio * N) per sample).
        generator: random source of the shuffle (global RNG when None); may live on another device.
    Returns:
        x_masked [B, N_keep, D] (visible tokens, in shuffled order),
        mask [B, N] (1 = hidden, 0 = visible; original token order),
        ids_restore [B, N] (position of each original token in the shuffled sequence: gathering
        `cat(visible, hidden)` with it restores the original order).
    """
    b, n, d = x.shape
    len_keep = n - num_masked_patches(n, mask_ratio)
    noise_device = generator.device if generator is not None else x.device
    noise = torch.rand(b, n, generator=generator, device=noise_device).to(x.device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the smallest noise values are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_masked, mask, ids_restore


class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT encoder on visible patches only and a light transformer decoder.

    Args:
        img_size: square input side (pretraining resolution, 224 in the paper).
        patch_size: patch side p.
        in_chans: image channels.
        embed_dim, depth, num_heads: encoder width, depth and heads.
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder width, depth and heads.
        mlp_ratio: MLP hidden width / width, encoder and decoder.
        norm_pix_loss: regress per-patch normalised pixels (mean 0, var 1 per patch) instead of pixels.
        mask_ratio: fraction of patches hidden from the encoder.
        grad_checkpointing: recompute each block in backward to save activation memory.
    Input images are normalised [B, in_chans, img_size, img_size] floats.
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        mask_ratio: float = 0.75,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio
        self.grad_checkpointing = grad_checkpointing
        norm_layer = partial(LayerNormFp32, eps=1e-6)
        # Global attention without relative positions while pretraining (window_size=0), as MAE.
        block = partial(Block, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm_layer, window_size=0)

        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos tables: parameters without gradient, so they sit in the state dict as in MAE.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(block(dim=embed_dim, num_heads=num_heads) for _ in range(depth))
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, self.num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            block(dim=decoder_embed_dim, num_heads=decoder_num_heads) for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE's init: sin-cos tables, xavier-uniform linears and patch projection, N(0, 0.02) tokens."""
        with torch.no_grad():
            self.pos_embed.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size, cls_token=True))
            self.decoder_pos_embed.copy_(
                get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.grid_size, cls_token=True)
            )
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer on flattened patches
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Names of multi-dimensional parameters to exclude from weight decay (norms and biases are 1-D)."""
        return {"cls_token", "mask_token", "pos_embed", "decoder_pos_embed"}

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, p*p*C], row-major patches, each flattened as (p_row, p_col, channel)."""
        b, c, h, w = imgs.shape
        p = self.patch_size
        if c != self.in_chans or h % p or w % p:
            raise ValueError(f"images must be [B, {self.in_chans}, k*{p}, m*{p}], got {tuple(imgs.shape)}")
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] with a square grid -> [B, C, H, W] (inverse of `patchify`)."""
        b, n, _ = x.shape
        p, c = self.patch_size, self.in_chans
        g = int(n**0.5)
        if g * g != n:
            raise ValueError(f"unpatchify needs a square number of patches, got {n}")
        x = torch.einsum("bhwpqc->bchpwq", x.reshape(b, g, g, p, p, c))
        return x.reshape(b, c, g * p, g * p)

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """See `random_masking` (module function)."""
        return random_masking(x, mask_ratio, generator)

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        # SAM's blocks take a [B, H, W, D] grid; a [B, 1, L, D] "grid" is a plain token sequence
        # under global attention without relative positions.
        x = x[:, None]
        for blk in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x[:, 0]

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, C, S, S] -> (latent [B, 1 + N_keep, D] with the class token first, mask [B, N], ids_restore [B, N])."""
        x = self.patch_embed(imgs).flatten(1, 2)  # [B, N, D]
        if x.shape[1] != self.num_patches:
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got {tuple(imgs.shape[-2:])}")
        x = x + self.pos_embed[:, 1:]
        x, mask, ids_restore = random_masking(x, mask_ratio, generator)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = self._run_blocks(self.blocks, torch.cat([cls, x], dim=1))
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, 1 + N_keep, D], ids_restore [B, N] -> per-patch predictions [B, N, p*p*C]."""
        x = self.decoder_embed(latent)
        b, n = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(b, n + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # shuffled order: visible, then hidden
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(self._run_blocks(self.decoder_blocks, x))
        return self.decoder_pred(x)[:, 1:]

    def patch_targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """Regression targets [B, N, p*p*C] (fp32): pixels, per-patch normalised when `norm_pix_loss`."""
        target = self.patchify(imgs.float())
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over hidden patches only.

        Args:
            imgs: [B, C, S, S]; pred: [B, N, p*p*C]; mask: [B, N] (1 = hidden).
        Returns:
            scalar: sum over hidden patches of the per-patch MSE / number of hidden patches.
        """
        per_patch = (pred.float() - self.patch_targets(imgs)).pow(2).mean(dim=-1)  # [B, N]
        mask = mask.float()
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, generator: torch.Generator | None = None, mask_ratio: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs [B, C, S, S] -> (loss scalar, pred [B, N, p*p*C], mask [B, N] with 1 = hidden)."""
        latent, mask, ids_restore = self.forward_encoder(
            imgs, self.mask_ratio if mask_ratio is None else mask_ratio, generator
        )
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


@dataclass(frozen=True)
class MaeConfig:
    """Hyper-parameters of one MAE size (keyword arguments of `MaskedAutoencoderViT`)."""

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = True
    mask_ratio: float = 0.75
    grad_checkpointing: bool = False


MAE_CONFIGS: dict[str, MaeConfig] = {
    "mae_vit_b": MaeConfig(),
    "mae_vit_l": MaeConfig(embed_dim=1024, depth=24, num_heads=16),
    # Patch 16 as SAM's ViT-H/16 (the released MAE ViT-H is /14, which SAM's encoder cannot take).
    "mae_vit_h": MaeConfig(embed_dim=1280, depth=32, num_heads=16),
    # Tiny: the encoder of SAM's vit_t (exports into it), 128 px -> 8x8 patches; CPU tests.
    "mae_vit_t": MaeConfig(
        img_size=128, embed_dim=96, depth=4, num_heads=3, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4
    ),
}


def build_mae(name: str = "mae_vit_b", **overrides: object) -> MaskedAutoencoderViT:
    """Build a registered MAE size with field overrides, e.g. `build_mae("mae_vit_l", grad_checkpointing=True)`."""
    if name not in MAE_CONFIGS:
        raise KeyError(f"unknown MAE size {name!r}; valid: {', '.join(MAE_CONFIGS)}")
    fields = {f.name for f in dataclasses.fields(MaeConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown MAE config field(s) {sorted(unknown)}; valid: {sorted(fields)}")
    cfg = dataclasses.replace(MAE_CONFIGS[name], **overrides)  # type: ignore[arg-type]
    return MaskedAutoencoderViT(**dataclasses.asdict(cfg))


_TIMM_MLP = re.compile(r"\.mlp\.fc([12])\.")
# Keys of timm / official MAE checkpoints with no counterpart in the MAE model (classifier heads).
_IGNORED_PREFIXES = ("head.", "fc_norm.", "head_drop.")


def timm_to_mae_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename timm VisionTransformer / official MAE keys to ours (`mlp.fcK` -> `mlp.linK`), drop heads."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(_IGNORED_PREFIXES):
            continue
        out[_TIMM_MLP.sub(r".mlp.lin\1.", key)] = value
    return out


def load_timm_state_dict(model: MaskedAutoencoderViT, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Load a timm `vit_*` or official MAE (`ckpt["model"]`) state dict into `model`.

    Every encoder weight must be present with the right shape; decoder weights are optional
    (timm classifiers and MAE's encoder-only releases have none).
    Returns:
        the names of the model's keys that the state dict did not provide (decoder ones).
    Raises:
        KeyError / ValueError naming the offending keys for unexpected keys, missing encoder
        weights or shape mismatches.
    """
    sd = timm_to_mae_state_dict(state_dict)
    own = model.state_dict()
    unexpected = sorted(set(sd) - set(own))
    if unexpected:
        raise KeyError(
            f"state dict has keys the MAE model lacks: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    bad = [f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"shape mismatch loading the state dict: {bad[:8]}")
    missing = sorted(set(own) - set(sd))
    missing_encoder = [k for k in missing if not k.startswith(("decoder_", "mask_token"))]
    if missing_encoder:
        raise KeyError(f"state dict lacks encoder weights: {missing_encoder[:8]}")
    model.load_state_dict(sd, strict=False)
    return missing
