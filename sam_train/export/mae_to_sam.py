"""Turn MAE-pretrained ViT weights into a SAM image encoder (ViTDet-style initialisation, as SAM did).

What carries over: the patch projection and every block (norms, attention, MLP) unchanged; the
absolute position embedding without its class token, bicubic-resampled from the pretraining grid
(e.g. 14x14 at 224 px) to SAM's (64x64 at 1024 px). What SAM adds is initialised as SAM does: the
decomposed relative position tables at zero (`rel_pos_zero_init`) and the conv neck as `build_sam`
initialises it. MAE's class token and final norm have no SAM counterpart and are dropped (SAM's
neck has its own norms). Windowed blocks reuse the global-attention weights unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from sam_train.models.checkpoint import CheckpointError, read_checkpoint_file, save_sam_checkpoint, strip_wrapper_names
from sam_train.models.mae import timm_to_mae_state_dict
from sam_train.models.pos_embed import interpolate_pos_embed_grid
from sam_train.models.registry import build_sam
from sam_train.models.sam import Sam

log = logging.getLogger(__name__)

_ENCODER_PREFIX = "image_encoder."
_LIGHTNING_PREFIX = "model."  # MaeModule's attribute holding the MAE


def unwrap_mae_state_dict(obj: object, source: str = "MAE checkpoint") -> dict[str, torch.Tensor]:
    """Plain MAE state dict in our key names from any supported container.

    Accepts our model's `state_dict()`, a Lightning checkpoint (`{"state_dict": {"model.…": …}}`),
    the official facebookresearch/mae layout (`{"model": {timm names}}`), and a timm ViT state dict.
    """
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source}: expected a state dict, or a dict with 'model' / 'state_dict'")
    # wrapper names (DDP / FSDP / Fabric / torch.compile: `strip_wrapper_names`), then Lightning's `model.`
    sd = {
        strip_wrapper_names(str(k)).removeprefix(_LIGHTNING_PREFIX): v
        for k, v in obj.items()
        if isinstance(v, torch.Tensor)
    }
    sd = timm_to_mae_state_dict(sd)
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight"):
        if key not in sd:
            raise CheckpointError(f"{source}: no MAE/ViT encoder weights (missing {key!r}); first keys: {list(sd)[:8]}")
    return sd


def _sam_template(sam_name: str, img_size: int | None, seed: int, overrides: dict[str, object]) -> Sam:
    """`build_sam` with its random init drawn from a private, seeded RNG (reproducible neck and decoder).

    `img_size` None keeps the registered size's input side (1024, vit_t 256).
    """
    if img_size is not None:
        overrides = {**overrides, "img_size": img_size}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_sam(sam_name, **overrides)


def _encoder_state_dict(mae_sd: Mapping[str, torch.Tensor], sam: Sam, source: str) -> dict[str, torch.Tensor]:
    """Map MAE encoder weights onto `sam.image_encoder`'s keys (without the `image_encoder.` prefix)."""
    template = sam.image_encoder.state_dict()
    enc = sam.image_encoder
    patch_w = mae_sd["patch_embed.proj.weight"]
    mae_depth = len({k.split(".")[1] for k in mae_sd if k.startswith("blocks.")})
    want = (template["patch_embed.proj.weight"].shape, enc.depth)
    got = (patch_w.shape, mae_depth)
    if got != want:
        raise CheckpointError(
            f"{source}: MAE encoder (patch projection {tuple(patch_w.shape)}, depth {mae_depth}) does not fit the "
            f"SAM encoder (patch projection {tuple(want[0])}, depth {want[1]}); pick the matching SAM size "
            f"(mae_vit_b -> vit_b, mae_vit_l -> vit_l, mae_vit_h -> vit_h, mae_vit_t -> vit_t)"
        )
    out: dict[str, torch.Tensor] = {}
    for key, init in template.items():
        if key == "pos_embed":
            grid = enc.img_size // enc.patch_size
            pos = interpolate_pos_embed_grid(mae_sd["pos_embed"].float(), (grid, grid))[:, 1:]  # drop cls
            out[key] = pos.reshape(init.shape).to(init.dtype)
        elif key.startswith("blocks.") and ".rel_pos_" not in key:
            if key not in mae_sd:
                raise CheckpointError(f"{source}: missing MAE weight {key!r}")
            if mae_sd[key].shape != init.shape:
                raise CheckpointError(
                    f"{source}: {key} has shape {tuple(mae_sd[key].shape)}, SAM expects {tuple(init.shape)}"
                )
            out[key] = mae_sd[key].to(init.dtype).clone()
        elif key.startswith("patch_embed."):
            out[key] = mae_sd[key].to(init.dtype).clone()
        else:  # relative position tables (zero-init) and the neck: SAM's own initialisation
            out[key] = init.clone()
    return out


def mae_to_sam_state_dict(
    mae_state_dict: Mapping[str, object],
    sam_name: str = "vit_b",
    img_size: int | None = None,
    *,
    seed: int = 0,
    **sam_overrides: object,
) -> dict[str, torch.Tensor]:
    """SAM image-encoder weights (`image_encoder.*` keys, official layout) from MAE weights.

    Args:
        mae_state_dict: our MAE's state dict, a Lightning checkpoint dict, or the official
            facebookresearch/mae `{"model": ...}` layout with timm key names.
        sam_name: registered SAM size whose encoder matches the MAE's width / depth / heads.
        img_size: SAM input side (default: the registered size's, 1024; vit_t 256); the position
            grid is resampled to img_size / patch_size.
        seed: seed of the neck's random initialisation.
        sam_overrides: further `SamConfig` fields (e.g. window_size, encoder_global_attn_indexes).
    """
    mae_sd = unwrap_mae_state_dict(mae_state_dict)
    sam = _sam_template(sam_name, img_size, seed, sam_overrides)
    return {_ENCODER_PREFIX + k: v for k, v in _encoder_state_dict(mae_sd, sam, "MAE state dict").items()}


def export_mae_to_sam(
    mae_ckpt_path: str | Path,
    out_path: str | Path,
    sam_name: str = "vit_b",
    img_size: int | None = None,
    *,
    seed: int = 0,
    **sam_overrides: object,
) -> Path:
    """Write a full SAM checkpoint: MAE-initialised image encoder, randomly initialised prompt encoder
    and mask decoder (as `build_sam` draws them with `seed`).

    The file is the official flat layout (`.safetensors` by suffix, else a torch pickle), so
    `build_sam(sam_name, checkpoint=out_path, img_size=img_size)` and `sam-train fit ...
    model.checkpoint=<out_path>` start from it. Reads the MAE checkpoint with `weights_only=True`.
    """
    source = str(mae_ckpt_path)
    mae_sd = unwrap_mae_state_dict(read_checkpoint_file(Path(mae_ckpt_path)), source)
    sam = _sam_template(sam_name, img_size, seed, sam_overrides)
    sam.image_encoder.load_state_dict(_encoder_state_dict(mae_sd, sam, source), strict=True)
    return save_sam_checkpoint(sam, out_path)
