"""Fine-tuning strategies as config switches: freezing parts, LoRA (peft), bottleneck adapters."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from sam_train.finetune.adapters import Adapter, AdapterConfig, add_adapters, has_adapters
from sam_train.finetune.freeze import SAM_PARTS, freeze_parts, trainable_parameter_names, unfreeze_encoder_tail
from sam_train.finetune.lora import LoraConfig, add_lora, merged_state_dict
from sam_train.models.sam import Sam

__all__ = [
    "SAM_PARTS",
    "Adapter",
    "AdapterConfig",
    "LoraConfig",
    "apply_finetune",
    "freeze_parts",
    "has_adapters",
    "merge_and_export_state_dict",
    "trainable_parameter_names",
    "unfreeze_encoder_tail",
]


def _as_config(value: Any, cls: type) -> Any:
    """Accept a config dataclass or a plain mapping (e.g. from Hydra/OmegaConf)."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls(
            **{k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v for k, v in value.items()}
        )
    raise TypeError(f"expected {cls.__name__} or a mapping, got {type(value).__name__}")


def apply_finetune(
    model: Sam,
    *,
    freeze: Iterable[str] = (),
    lora: LoraConfig | Mapping[str, Any] | None = None,
    adapter: AdapterConfig | Mapping[str, Any] | None = None,
    encoder_tail: int | None = None,
) -> Sam:
    """Configure `model` in place for a fine-tuning strategy and return it.

    Args:
        freeze: parts among "image_encoder", "prompt_encoder", "mask_decoder" whose weights stay fixed.
        lora: LoRA on the image encoder (its other weights are frozen, as SAMed).
        adapter: bottleneck adapters in every encoder block (its other weights frozen unless
            adapter.train_encoder, as SAM-Med2D).
        encoder_tail: with the image encoder frozen, its neck and last `encoder_tail` units (blocks and
            downsamplings, `TinyViT.units`) train again: a partial encoder fine-tune on cached features.
    Load pretrained weights before calling this: LoRA changes the encoder's module tree.
    """
    freeze = tuple(freeze)
    lora = _as_config(lora, LoraConfig)
    adapter = _as_config(adapter, AdapterConfig)
    if "image_encoder" in freeze and (lora is not None or adapter is not None):
        raise ValueError("apply_finetune: freeze=['image_encoder'] would also freeze its LoRA / adapter weights")
    if adapter is not None:
        add_adapters(model.image_encoder, adapter)
    if lora is not None:
        add_lora(model.image_encoder, lora)
        if adapter is not None:  # add_lora froze everything but LoRA: re-enable the adapters
            for name, p in model.image_encoder.named_parameters():
                if "_adapter." in name and ".lora_" not in name:
                    p.requires_grad_(True)
    freeze_parts(model, freeze)
    if encoder_tail is not None:
        if "image_encoder" not in freeze:
            raise ValueError("apply_finetune: encoder_tail needs freeze=['image_encoder', ...] (the rest stays frozen)")
        unfreeze_encoder_tail(model, encoder_tail)
    if not trainable_parameter_names(model):
        raise ValueError("apply_finetune: nothing left to train")
    return model


def merge_and_export_state_dict(model: Sam, *, include_adapters: bool = False) -> dict[str, torch.Tensor]:
    """Official-layout state dict with LoRA merged into the base weights (loads in `segment_anything`).

    Adapters add layers the official model does not have: they cannot be merged, so exporting an
    adapter model raises unless include_adapters=True (then the extra keys are kept).
    """
    sd = merged_state_dict(model)
    extra = [k for k in sd if "_adapter." in k]
    if extra and not include_adapters:
        raise ValueError(
            f"merge_and_export_state_dict: the model has {len(extra)} adapter weights (e.g. {extra[0]}) that the "
            "official SAM cannot hold; pass include_adapters=True to keep them (the file then needs sam_train)"
        )
    return {k: v.clone() for k, v in sd.items()}
