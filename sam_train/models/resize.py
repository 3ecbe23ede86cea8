"""Resize-longest-side geometry shared by the model, the data pipeline and the predictor."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """Size after scaling so that the longest side equals `long_side` (rounded as SAM does)."""
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_longest_side(image: torch.Tensor, long_side: int) -> torch.Tensor:
    """[..., C, H, W] image (uint8 or float) -> same dtype, longest side = long_side (antialiased bilinear)."""
    h, w = image.shape[-2:]
    size = preprocess_shape(h, w, long_side)
    if size == (h, w):
        return image
    lead = image.shape[:-3]
    x = image.reshape(-1, *image.shape[-3:]).float()
    x = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=True)
    if image.dtype == torch.uint8:
        x = x.round().clamp(0, 255)
    return x.to(image.dtype).reshape(*lead, image.shape[-3], *size)


def resize_masks_longest_side(masks: torch.Tensor, long_side: int) -> torch.Tensor:
    """[..., H, W] bool masks -> nearest-resized bool masks with longest side = long_side."""
    h, w = masks.shape[-2:]
    size = preprocess_shape(h, w, long_side)
    if size == (h, w):
        return masks
    lead = masks.shape[:-2]
    x = masks.reshape(-1, 1, h, w).float()
    x = F.interpolate(x, size, mode="nearest-exact")
    return x.reshape(*lead, *size) > 0.5


def scale_coords(coords: torch.Tensor, original_size: tuple[int, int], long_side: int) -> torch.Tensor:
    """[..., 2] (x, y) coordinates in the original image -> coordinates in the resized image."""
    h, w = original_size
    new_h, new_w = preprocess_shape(h, w, long_side)
    scale = torch.tensor([new_w / w, new_h / h], dtype=torch.float32, device=coords.device)
    return coords.float() * scale


def scale_boxes(boxes: torch.Tensor, original_size: tuple[int, int], long_side: int) -> torch.Tensor:
    """[..., 4] (x0, y0, x1, y1) boxes in the original image -> boxes in the resized image."""
    return scale_coords(boxes.reshape(*boxes.shape[:-1], 2, 2), original_size, long_side).reshape(boxes.shape)
