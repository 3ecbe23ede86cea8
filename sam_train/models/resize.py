"""Resize-longest-side geometry shared by the model, the data pipeline and the predictor."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """Size after scaling so that the longest side equals `long_side` (rounded as SAM does)."""
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[..., C, H, W] image (uint8 or float) -> same dtype at `size` (h, w), antialiased bilinear (uint8 rounded)."""
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) == size:
        return image
    lead = image.shape[:-3]
    x = image.reshape(-1, *image.shape[-3:]).float()
    x = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=True)
    if image.dtype == torch.uint8:
        x = x.round().clamp(0, 255)
    return x.to(image.dtype).reshape(*lead, image.shape[-3], *size)


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[..., H, W] bool masks -> bool masks at `size` (h, w), nearest (`nearest-exact`)."""
    size = (int(size[0]), int(size[1]))
    h, w = masks.shape[-2:]
    if (h, w) == size:
        return masks
    x = F.interpolate(masks.reshape(-1, 1, h, w).float(), size, mode="nearest-exact")
    return x.reshape(*masks.shape[:-2], *size) > 0.5


def resize_longest_side(image: torch.Tensor, long_side: int) -> torch.Tensor:
    """[..., C, H, W] image (uint8 or float) -> same dtype, longest side = long_side (antialiased bilinear)."""
    return resize_image(image, preprocess_shape(*image.shape[-2:], long_side))


def resize_masks_longest_side(masks: torch.Tensor, long_side: int) -> torch.Tensor:
    """[..., H, W] bool masks -> nearest-resized bool masks with longest side = long_side."""
    return resize_masks(masks, preprocess_shape(*masks.shape[-2:], long_side))


def scale_coords(coords: torch.Tensor, original_size: tuple[int, int], long_side: int) -> torch.Tensor:
    """[..., 2] (x, y) coordinates in the original image -> coordinates in the resized image."""
    h, w = original_size
    new_h, new_w = preprocess_shape(h, w, long_side)
    scale = torch.tensor([new_w / w, new_h / h], dtype=torch.float32, device=coords.device)
    return coords.float() * scale


def scale_boxes(boxes: torch.Tensor, original_size: tuple[int, int], long_side: int) -> torch.Tensor:
    """[..., 4] (x0, y0, x1, y1) boxes in the original image -> boxes in the resized image."""
    return scale_coords(boxes.reshape(*boxes.shape[:-1], 2, 2), original_size, long_side).reshape(boxes.shape)
