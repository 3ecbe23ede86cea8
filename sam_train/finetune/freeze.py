"""Freezing whole parts of SAM (image encoder, prompt encoder, mask decoder)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

SAM_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


def freeze_parts(model: nn.Module, parts: Iterable[str]) -> None:
    """Set requires_grad=False on every parameter of the named parts of a `Sam`.

    Frozen parameters get no gradient, so `param_groups` leaves them out of the optimizer and they stay
    bit-identical through training. Frozen parts stay in the model's train/eval mode (no dropout or
    batch-norm in SAM, so mode does not matter).
    """
    for part in parts:
        if part not in SAM_PARTS:
            raise ValueError(f"freeze: unknown SAM part {part!r}; valid: {', '.join(SAM_PARTS)}")
        for p in getattr(model, part).parameters():
            p.requires_grad_(False)


def unfreeze_encoder_tail(model: nn.Module, units: int) -> None:
    """Let the image encoder's neck and its last `units` units (blocks, downsamplings: `TinyViT.units`,
    `ImageEncoderViT.units`) train.

    A partial encoder fine-tune: the frozen front is encoded once and cached
    (`sam_train.data.cached.CachedEmbeddingDataModule`), and only the tail runs, forward and backward, each step.
    """
    encoder = model.image_encoder
    if not hasattr(encoder, "units"):
        raise ValueError(f"encoder_tail: {type(encoder).__name__} has no unit split (TinyViT, ImageEncoderViT have)")
    n = len(encoder.units())
    if not 0 <= units <= n:
        raise ValueError(f"encoder_tail must be in [0, {n}] for this encoder, got {units}")
    for name, p in encoder.named_parameters():
        if encoder.unit_of(name) >= n - units:
            p.requires_grad_(True)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that will be trained (requires_grad)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]
