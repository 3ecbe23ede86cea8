"""Named SAM models, timm-style: name -> config (`sam_train.models.configs`) -> builder -> weights.

`build_sam(name, checkpoint=None, pretrained=False, **overrides)` is the one way to build any of them.
"""

from __future__ import annotations

from pathlib import Path

from sam_train.models.checkpoint import CheckpointError, load_sam_weights
from sam_train.models.configs import PRETRAINED, ModelConfig, sam_config
from sam_train.models.mask_decoder import MaskDecoder
from sam_train.models.pretrained import bundled_weights
from sam_train.models.prompt_encoder import PromptEncoder
from sam_train.models.sam import PIXEL_MEAN, PIXEL_STD, Sam
from sam_train.models.transformer import TwoWayTransformer


def build_sam_from_config(cfg: ModelConfig) -> Sam:
    """Instantiate the three parts of SAM from a config (random weights)."""
    grid = cfg.embed_size
    return Sam(
        image_encoder=cfg.build_encoder(),
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
        pixel_mean=PIXEL_MEAN,
        pixel_std=PIXEL_STD,
        pixel_norm=cfg.pixel_norm,
    )


def build_sam(
    name: str = "vit_b", checkpoint: str | Path | None = None, pretrained: bool = False, **overrides: object
) -> Sam:
    """Build a registered SAM model, optionally with weights.

    Args:
        name: a key of SAM_CONFIGS (vit_t / vit_b / vit_l / vit_h / mobile_sam / lite_medsam).
        checkpoint: weights in any supported layout, or the name of bundled weights ("lite_medsam");
            a checkpoint wins over `pretrained` (fine-tuned weights of a model whose config says pretrained).
        pretrained: load the bundled weights of `name` (only names in PRETRAINED have them).
        overrides: config fields, e.g. drop_path_rate=0.6.
    Example: `build_sam("lite_medsam", pretrained=True)`, `build_sam("vit_b", "sam_vit_b_01ec64.pth")`.
    """
    if pretrained and checkpoint is None:
        if name not in PRETRAINED:
            raise CheckpointError(
                f"model={name} has no bundled weights (pretrained=true works for {', '.join(PRETRAINED)}); "
                f"pass a checkpoint file instead"
            )
        checkpoint = name
    model = build_sam_from_config(sam_config(name, **overrides))
    if checkpoint is not None:
        path = bundled_weights(str(checkpoint)) if str(checkpoint) in PRETRAINED else checkpoint
        load_sam_weights(model, path)
    return model
