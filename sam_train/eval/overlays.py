"""Overlay images for eyeballing results: image, prompts, prediction and ground truth in one picture.

Prediction: translucent fill, one colour per object (or per label value for label maps).
Ground truth: 1-pixel outline in the same palette, drawn over the fill.
Points: green dots for positive clicks (label 1), red for negative (0); padding (-1) and box corners
(2, 3) are not drawn as dots. Boxes: cyan rectangles (x0, y0, x1, y1).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from sam_train.io import safe_file_name

_POSITIVE, _NEGATIVE, _BOX = (0, 220, 0), (230, 0, 0), (0, 230, 230)


def _palette(n: int) -> np.ndarray:
    from matplotlib import colormaps

    colours = np.asarray(colormaps["tab10"].colors)[:, :3] * 255
    return colours[np.arange(n) % len(colours)].astype(np.float32)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _as_masks(masks, hw: tuple[int, int], name: str) -> tuple[np.ndarray, np.ndarray]:
    """bool [N, H, W] or int label map [H, W] -> (bool [K, H, W], colour index [K])."""
    m = _numpy(masks)
    if m.shape[-2:] != hw:
        raise ValueError(f"{name} of shape {m.shape} does not match the image size {hw}")
    if m.ndim == 3 and m.dtype == bool:
        return m, np.arange(len(m))
    if m.ndim == 2 and np.issubdtype(m.dtype, np.integer):
        values = [int(v) for v in np.unique(m) if v != 0]
        return (np.stack([m == v for v in values]) if values else np.zeros((0, *hw), bool)), np.asarray(values) - 1
    raise ValueError(f"{name} must be bool masks [N, H, W] or an int label map [H, W], got {m.dtype}{m.shape}")


def draw_overlay(
    image: torch.Tensor | np.ndarray,
    *,
    pred: torch.Tensor | np.ndarray | None = None,
    gt: torch.Tensor | np.ndarray | None = None,
    points: torch.Tensor | np.ndarray | None = None,
    point_labels: torch.Tensor | np.ndarray | None = None,
    boxes: torch.Tensor | np.ndarray | None = None,
    alpha: float = 0.45,
) -> torch.Tensor:
    """Draw an overlay.

    Args:
        image: uint8 [3, H, W].
        pred, gt: bool [N, H, W] (per object) or int label map [H, W] (0 background).
        points: [K, 2] (x, y) pixel coordinates; point_labels: [K] (default all positive).
        boxes: [B, 4] (x0, y0, x1, y1).
        alpha: opacity of the prediction fill.
    Returns:
        uint8 [3, H, W].
    """
    from PIL import Image, ImageDraw

    img = _numpy(image)
    if img.ndim != 3 or img.shape[0] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [3, H, W], got {img.dtype}{img.shape}")
    hw = img.shape[1:]
    canvas = img.transpose(1, 2, 0).astype(np.float32)
    if pred is not None:
        masks, colour_ids = _as_masks(pred, hw, "pred")
        colours = _palette(int(colour_ids.max()) + 1 if len(colour_ids) else 0)
        for mask, c in zip(masks, colour_ids, strict=True):
            canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colours[c]
    if gt is not None:
        masks, colour_ids = _as_masks(gt, hw, "gt")
        colours = _palette(int(colour_ids.max()) + 1 if len(colour_ids) else 0)
        for mask, c in zip(masks, colour_ids, strict=True):
            canvas[mask & ~ndimage.binary_erosion(mask)] = colours[c]
    pil = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    if boxes is not None:
        for x0, y0, x1, y1 in _numpy(boxes).reshape(-1, 4).tolist():
            draw.rectangle((x0, y0, x1, y1), outline=_BOX, width=max(1, min(hw) // 128))
    if points is not None:
        pts = _numpy(points).reshape(-1, 2)
        labels = np.ones(len(pts), np.int64) if point_labels is None else _numpy(point_labels).reshape(-1)
        if len(labels) != len(pts):
            raise ValueError(f"got {len(pts)} points but {len(labels)} point labels")
        r = max(2, min(hw) // 64)
        for (x, y), lab in zip(pts.tolist(), labels.tolist(), strict=True):
            if lab in (0, 1):
                colour = _POSITIVE if lab == 1 else _NEGATIVE
                draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=(255, 255, 255))
    return torch.from_numpy(np.asarray(pil).transpose(2, 0, 1).copy())


def to_uint8(image: np.ndarray | torch.Tensor, low: float = 0.5, high: float = 99.5) -> torch.Tensor:
    """A grey slice of any intensity range [H, W] -> uint8 [3, H, W], clipped to the given percentiles
    (for overlays of medical slices whose intensities are not 0-255)."""
    x = _numpy(image).astype(np.float32)
    lo, hi = np.percentile(x, [low, high])
    x = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    return torch.from_numpy(np.repeat((x + 0.5).astype(np.uint8)[None], 3, axis=0))


def largest_slice(labels: np.ndarray | torch.Tensor, axis: int = 0) -> int:
    """Index of the slice along `axis` with the most foreground (non-zero) voxels."""
    fg = _numpy(labels) != 0
    return int(fg.sum(axis=tuple(i for i in range(fg.ndim) if i != axis)).argmax())


def save_overlays(
    items: Iterable[Mapping], out_dir: str | Path, *, max_cases: int = 8, alpha: float = 0.45
) -> list[Path]:
    """Save overlays of the first `max_cases` items as `<out_dir>/<id>.png`.

    Each item has "id" (str) and "image" uint8 [3, H, W], and optionally "pred", "gt", "points",
    "point_labels", "boxes" (see `draw_overlay`).
    """
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for item in items:
        if len(paths) >= max_cases:
            break
        if "id" not in item or "image" not in item:
            raise ValueError(f"overlay item needs 'id' and 'image', got keys {sorted(item)}")
        drawn = draw_overlay(
            item["image"],
            **{k: item.get(k) for k in ("pred", "gt", "points", "point_labels", "boxes")},
            alpha=alpha,
        )
        path = out_dir / f"{safe_file_name(str(item['id']))}.png"
        Image.fromarray(drawn.numpy().transpose(1, 2, 0)).save(path)
        paths.append(path)
    return paths
