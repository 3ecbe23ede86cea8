"""Box prompts: tight boxes of masks, SAM-style Gaussian jitter, MedSAM-style uniform expansion.

Boxes are float [M, 4] (x0, y0, x1, y1) in pixel indices, corners inclusive (as
`torchvision.ops.masks_to_boxes` returns them). Random functions draw from the given
`torch.Generator` only, one fixed-shape draw per call (see each docstring).
"""

from __future__ import annotations

import torch

from sam_train.models.prompt_encoder import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT

ImageSize = tuple[int, int] | torch.Tensor


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """bool [M, H, W] -> float32 [M, 4] tight (x0, y0, x1, y1) boxes, x1 / y1 the last pixel inside
    (`torchvision.ops.masks_to_boxes`' and SAM's convention); empty masks give zeros, M = 0 a [0, 4] tensor.

    Vectorised over masks (first / last occupied row and column), on the masks' device.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be [M, H, W], got shape {tuple(masks.shape)}")
    masks = masks.bool()
    if masks.shape[0] == 0:
        return torch.zeros(0, 4, device=masks.device)
    rows, cols = masks.any(dim=-1), masks.any(dim=-2)  # [M, H], [M, W]

    def first_last(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(torch.uint8)
        return x.argmax(dim=-1), x.shape[-1] - 1 - x.flip(-1).argmax(dim=-1)

    (y0, y1), (x0, x1) = first_last(rows), first_last(cols)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1) * rows.any(dim=-1, keepdim=True)
    return boxes.float()


def clip_boxes(boxes: torch.Tensor, image_size: ImageSize) -> torch.Tensor:
    """Clip [M, 4] boxes to pixel indices of an image of `image_size`.

    image_size: (H, W) shared by all boxes, or int [M, 2] (h, w) per box.
    """
    size = torch.as_tensor(image_size, device=boxes.device, dtype=boxes.dtype)
    size = size.expand(boxes.shape[0], 2) if size.dim() == 1 else size
    hi = (size.flip(-1) - 1).repeat(1, 2)  # [M, 4] = (w-1, h-1, w-1, h-1)
    return torch.minimum(boxes.clamp(min=0), hi)


def _order_corners(boxes: torch.Tensor) -> torch.Tensor:
    """Swap corners where noise crossed them, so x0 <= x1 and y0 <= y1."""
    lo = torch.minimum(boxes[:, :2], boxes[:, 2:])
    hi = torch.maximum(boxes[:, :2], boxes[:, 2:])
    return torch.cat([lo, hi], dim=1)


def jitter_boxes(
    boxes: torch.Tensor,
    generator: torch.Generator,
    *,
    noise_std: float = 0.1,
    max_noise: float = 20.0,
    image_size: ImageSize | None = None,
) -> torch.Tensor:
    """SAM's box noise: each coordinate moves by N(0, (noise_std * side)^2), truncated at max_noise.

    The side is the box width for x coordinates and its height for y coordinates. Guarantee: every
    output coordinate is within `max_noise` pixels of the input coordinate (corner re-ordering and
    clipping to the image never increase that distance for boxes inside the image).

    Args:
        boxes: float [M, 4] (x0, y0, x1, y1).
        generator: one `torch.randn(M, 4)` float32 draw.
        noise_std: noise std as a fraction of the side length (paper: 0.1).
        max_noise: cap on the displacement of each coordinate in pixels (paper: 20).
        image_size: (H, W) or int [M, 2] (h, w) to clip to; None leaves boxes unclipped.
    Returns:
        float [M, 4] noisy boxes with x0 <= x1, y0 <= y1.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [M, 4] (x0, y0, x1, y1), got shape {tuple(boxes.shape)}")
    z = torch.randn(boxes.shape[0], 4, generator=generator, device=generator.device).to(boxes.device)
    sides = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)  # (w, h, w, h)
    noise = (z * noise_std * sides).clamp(-max_noise, max_noise)
    out = _order_corners(boxes + noise)
    return out if image_size is None else clip_boxes(out, image_size)


def expand_boxes_uniform(
    boxes: torch.Tensor,
    generator: torch.Generator,
    *,
    max_shift: int = 20,
    image_size: ImageSize | None = None,
) -> torch.Tensor:
    """MedSAM's box perturbation: every side moves outwards by an integer uniform in [0, max_shift].

    Args:
        boxes: float [M, 4] (x0, y0, x1, y1).
        generator: one `torch.randint(0, max_shift + 1, (M, 4))` draw.
        max_shift: largest outward shift in pixels (MedSAM: 20).
        image_size: (H, W) or int [M, 2] (h, w) to clip to; None leaves boxes unclipped.
    Returns:
        float [M, 4] boxes containing the input boxes.
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [M, 4] (x0, y0, x1, y1), got shape {tuple(boxes.shape)}")
    shift = torch.randint(0, max_shift + 1, (boxes.shape[0], 4), generator=generator, device=generator.device)
    direction = torch.tensor([-1.0, -1.0, 1.0, 1.0], device=boxes.device, dtype=boxes.dtype)
    out = boxes + shift.to(boxes.device, boxes.dtype) * direction
    return out if image_size is None else clip_boxes(out, image_size)


def box_corner_points(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, 4] boxes -> corner points float [M, 2, 2] (x, y) and labels int64 [M, 2] = (2, 3)."""
    coords = boxes.reshape(-1, 2, 2)
    labels = torch.tensor([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], device=boxes.device).expand(coords.shape[0], 2)
    return coords, labels
