"""Optimizer parameter groups: no weight decay on norms / biases / position tables, layer-wise lr decay."""

from __future__ import annotations

from typing import Any

from torch import nn

from sam_train.models.image_encoder import ImageEncoderViT
from sam_train.models.tiny_vit import TinyViT

# Encoders with a depth order for layer-wise lr decay: `layer_id(name)` and `num_lr_layers`.
LAYERED_ENCODERS = (ImageEncoderViT, TinyViT)

# Parameters named like this are position tables: decaying them towards zero has no regulariser meaning.
NO_DECAY_KEYWORDS = ("pos_embed", "rel_pos_h", "rel_pos_w", "positional_embedding", "positional_encoding")
# Token tables (point / mask / IoU tokens, no-mask embedding) are embeddings, not weights of a map.
NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (nn.Embedding,)


def no_decay_names(
    model: nn.Module,
    keywords: tuple[str, ...] = NO_DECAY_KEYWORDS,
    modules: tuple[type[nn.Module], ...] = NO_DECAY_MODULES,
) -> set[str]:
    """Names of the parameters that get no weight decay: 1-D ones (biases and every norm's weight / bias:
    LayerNorm, LayerNorm2d), those of `modules` (token tables), names containing one of `keywords`
    (position tables) and the names the model's own `no_weight_decay()` lists (the timm / MAE convention).
    """
    own = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    names = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p.ndim <= 1 or isinstance(module, modules) or any(k in full for k in keywords) or full in own:
                names.add(full)
    return names


def _layer_scales(model: nn.Module, layer_decay: float) -> dict[str, float]:
    """lr scale of every parameter inside an image encoder: decay ** (num_lr_layers - layer_id)."""
    scales: dict[str, float] = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, LAYERED_ENCODERS):
            prefix = f"{mod_name}." if mod_name else ""
            for p_name, _ in module.named_parameters():
                scales[prefix + p_name] = layer_decay ** (module.num_lr_layers - module.layer_id(p_name))
    return scales


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    layer_decay: float | None = None,
    no_decay_keywords: tuple[str, ...] = NO_DECAY_KEYWORDS,
) -> list[dict[str, Any]]:
    """Parameter groups for torch optimizers, trainable (requires_grad) parameters only.

    Args:
        model: a `Sam` (or any module containing an `ImageEncoderViT` or a `TinyViT`).
        lr: base learning rate (decoder / prompt encoder / neck run at it).
        weight_decay: applied to weight matrices / kernels only; 0 for biases, norms, position
            tables, rel-pos tables and embedding (token) tables.
        layer_decay: layer-wise lr decay of the image encoder (SAM paper: 0.8 ViT-H, 0.6 ViT-B); a
            parameter at encoder layer i gets lr * layer_decay ** (depth + 1 - i), where layer 0 is
            the patch / position embedding, blocks are 1..depth and the neck is depth + 1 (scale 1).
            TinyViT follows its own stage order (MobileSAM's `set_layer_lr_decay`): block i of all
            stages gets decay ** (blocks - 1 - i), the stem the first block's, the last block and
            the neck 1.
        no_decay_keywords: substrings of parameter names that get no weight decay.
    Returns:
        groups with 'params', 'param_names', 'lr', 'weight_decay' and 'lr_scale' (schedulers that
        rescale lr per step should multiply by 'lr_scale'; LambdaLR already does via the initial lr).
    """
    no_decay = no_decay_names(model, tuple(no_decay_keywords))
    scales = _layer_scales(model, layer_decay) if layer_decay is not None else {}
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = scales.get(name, 1.0)
        decay = name not in no_decay
        group = groups.setdefault(
            (scale, decay),
            {
                "params": [],
                "param_names": [],
                "lr": lr * scale,
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
            },
        )
        group["params"].append(p)
        group["param_names"].append(name)
    if not groups:
        raise ValueError("param_groups: the model has no trainable parameters (everything is frozen)")
    return list(groups.values())
