"""Registry of SAM sizes: the official vit_b / vit_l / vit_h and a tiny vit_t for CPU tests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from sam_train.models.image_encoder import ImageEncoderViT
from sam_train.models.mask_decoder import MaskDecoder
from sam_train.models.prompt_encoder import PromptEncoder
from sam_train.models.sam import Sam
from sam_train.models.transformer import TwoWayTransformer


@dataclass(frozen=True)
class SamConfig:
    """Hyper-parameters of one SAM size (the official ones as defaults: vit_b)."""

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


SAM_CONFIGS: dict[str, SamConfig] = {
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
}


def sam_config(name: str, **overrides: object) -> SamConfig:
    """The registered config of `name`, with field overrides."""
    if name not in SAM_CONFIGS:
        raise KeyError(f"unknown SAM size {name!r}; valid: {', '.join(SAM_CONFIGS)}")
    fields = {f.name for f in dataclasses.fields(SamConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown SAM config field(s) {sorted(unknown)}; valid: {sorted(fields - {'extra'})}")
    if "encoder_global_attn_indexes" in overrides:
        overrides["encoder_global_attn_indexes"] = tuple(overrides["encoder_global_attn_indexes"])  # type: ignore[arg-type]
    return dataclasses.replace(SAM_CONFIGS[name], **overrides)  # type: ignore[arg-type]


def build_sam_from_config(cfg: SamConfig) -> Sam:
    """Instantiate the three parts of SAM from a config (random weights)."""
    grid = cfg.img_size // cfg.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.encoder_embed_dim,
            depth=cfg.encoder_depth,
            num_heads=cfg.encoder_num_heads,
            out_chans=cfg.prompt_embed_dim,
            window_size=cfg.window_size,
            global_attn_indexes=cfg.encoder_global_attn_indexes,
            drop_path_rate=cfg.drop_path_rate,
            grad_checkpointing=cfg.grad_checkpointing,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(cfg.img_size, cfg.img_size),
            mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=cfg.prompt_embed_dim,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth,
                embedding_dim=cfg.prompt_embed_dim,
                num_heads=cfg.decoder_num_heads,
                mlp_dim=cfg.decoder_mlp_dim,
            ),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )


def build_sam(name: str = "vit_b", checkpoint: str | Path | None = None, **overrides: object) -> Sam:
    """Build a registered SAM size, optionally loading weights in any supported checkpoint layout.

    Example: `build_sam("vit_b", "sam_vit_b_01ec64.pth", drop_path_rate=0.6)`.
    """
    model = build_sam_from_config(sam_config(name, **overrides))
    if checkpoint is not None:
        from sam_train.models.checkpoint import load_sam_weights

        load_sam_weights(model, checkpoint)
    return model
