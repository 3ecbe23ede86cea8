"""Automatic mask generation ("segment everything"): a grid of point prompts, filtered and de-duplicated.

Same algorithm, defaults and output records as the official `SamAutomaticMaskGenerator` (SA-1B style):
1. optionally split the image into overlapping crops (layer i has 2^i x 2^i crops);
2. per crop, prompt every point of a regular grid with one positive click, 3 masks each;
3. drop masks with low predicted IoU or low stability score (IoU of the mask thresholded at
   +offset and -offset), and masks touching a crop edge that is not an image edge;
4. NMS on mask boxes (per crop by predicted IoU, across crops preferring smaller crops);
5. optionally remove small islands and holes, then encode as COCO RLE (pycocotools) or bool arrays.
Masks are kept as compressed RLE between steps so memory stays flat on large images.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import batched_nms, box_area

from sam_train.data.rle import decode_rle, encode_mask, encode_masks
from sam_train.inference.predictor import SamPredictor, image_to_tensor
from sam_train.models.resize import preprocess_shape
from sam_train.models.sam import Sam
from sam_train.prompts.boxes import masks_to_boxes

OUTPUT_MODES = ("binary_mask", "coco_rle")


def build_point_grid(n_per_side: int) -> torch.Tensor:
    """[n*n, 2] (x, y) cell centres of an n x n grid over [0, 1]^2, row by row (float64)."""
    side = (torch.arange(n_per_side, dtype=torch.float64) + 0.5) / n_per_side
    ys, xs = torch.meshgrid(side, side, indexing="ij")
    return torch.stack([xs, ys], dim=-1).reshape(-1, 2)


def _crop_side(length: int, n_crops: int, overlap: int) -> int:
    """Side of each of n_crops crops that tile `length` with `overlap` pixels between neighbours."""
    return math.ceil((overlap * (n_crops - 1) + length) / n_crops)


def generate_crop_boxes(
    image_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> list[tuple[tuple[int, int, int, int], int]]:
    """Crop boxes (x0, y0, x1, y1) with their layer: the full image, then 2^i x 2^i overlapping crops per layer i."""
    h, w = image_size
    crops = [((0, 0, w, h), 0)]
    for layer in range(1, n_layers + 1):
        n = 2**layer
        overlap = int(overlap_ratio * min(h, w) * (2 / n))  # later layers overlap less, in pixels
        cw, ch = _crop_side(w, n, overlap), _crop_side(h, n, overlap)
        for i in range(n):  # x outer, y inner: the official order, which NMS tie-breaking depends on
            for j in range(n):
                x0, y0 = (cw - overlap) * i, (ch - overlap) * j
                crops.append(((x0, y0, min(x0 + cw, w), min(y0 + ch, h)), layer))
    return crops


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """[N, H, W] mask logits -> [N] IoU of the masks thresholded at threshold + offset and threshold - offset.

    The high mask is contained in the low one, so the IoU is |high| / |low|.
    """
    high = (logits > threshold + offset).sum(dim=(-2, -1))
    low = (logits > threshold - offset).sum(dim=(-2, -1))
    return high / low


def box_near_crop_edge(
    boxes: torch.Tensor, crop_box: tuple[int, int, int, int], image_box: tuple[int, int, int, int], atol: float = 20.0
) -> torch.Tensor:
    """[N, 4] boxes in image coordinates -> [N] bool: a side within atol of a crop edge that is no image edge."""
    crop = torch.tensor(crop_box, dtype=torch.float32, device=boxes.device)
    image = torch.tensor(image_box, dtype=torch.float32, device=boxes.device)
    boxes = boxes.float()
    near_crop = (boxes - crop).abs() <= atol
    near_image = (boxes - image).abs() <= atol
    return (near_crop & ~near_image).any(dim=-1)


def remove_small_regions(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    """Fill holes and drop islands smaller than min_area (8-connectivity); keeps the largest island if all are small.

    Returns the new [H, W] bool mask and whether anything changed.
    """
    try:
        from scipy import ndimage
    except ImportError as e:  # scipy is only needed for this optional step
        raise ImportError("min_mask_region_area > 0 needs scipy (pip install scipy)") from e
    eight = np.ones((3, 3), dtype=bool)
    changed = False
    holes, n = ndimage.label(~mask, structure=eight)
    sizes = np.bincount(holes.ravel(), minlength=n + 1)[1:]
    small = np.flatnonzero(sizes < min_area) + 1
    if small.size:
        mask = mask | np.isin(holes, small)
        changed = True
    islands, n = ndimage.label(mask, structure=eight)
    sizes = np.bincount(islands.ravel(), minlength=n + 1)[1:]
    small = sizes < min_area
    if small.any():
        keep = np.flatnonzero(~small) + 1
        if keep.size == 0:
            keep = np.array([int(np.argmax(sizes)) + 1])
        mask = np.isin(islands, keep)
        changed = True
    return mask, changed


def _take(data: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """Index every field of a record batch (tensors and lists) with [n] bool or int64 indices."""
    idx = keep.nonzero().flatten() if keep.dtype == torch.bool else keep
    idx_list = idx.tolist()
    return {k: [v[i] for i in idx_list] if isinstance(v, list) else v[idx.to(v.device)] for k, v in data.items()}


def _cat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate record batches with the same fields."""
    return {
        k: [r for p in parts for r in p[k]] if isinstance(v, list) else torch.cat([p[k] for p in parts])
        for k, v in parts[0].items()
    }


def _xywh(box: torch.Tensor) -> list[int]:
    x0, y0, x1, y1 = (int(v) for v in box.tolist())
    return [x0, y0, x1 - x0, y1 - y0]


class AutomaticMaskGenerator:
    """Segment everything in an image with a point grid (defaults: the official ones, tuned for ViT-H).

    Args:
        model: a `Sam` in eval mode.
        points_per_side: grid points along each side; points_per_side^2 prompts per crop.
        points_per_batch: prompts decoded at once (memory vs speed).
        pred_iou_thresh: keep masks whose predicted IoU is above this (0 disables the filter).
        stability_score_thresh: keep masks whose stability score is at least this (0 disables).
        stability_score_offset: logit offset of the stability score's two thresholds.
        box_nms_thresh: box IoU above which duplicate masks of one crop are suppressed.
        crop_n_layers: extra crop layers; layer i runs on 2^i x 2^i overlapping crops.
        crop_nms_thresh: box IoU for de-duplicating masks across crops (smaller crops win).
        crop_overlap_ratio: crop overlap as a fraction of the short image side in layer 1.
        crop_n_points_downscale_factor: layer i uses points_per_side / factor^i points per side.
        min_mask_region_area: if > 0, fill holes and remove islands below this area (needs scipy).
        output_mode: "binary_mask" ([H, W] bool arrays) or "coco_rle" (pycocotools RLE with str counts).
    """

    def __init__(
        self,
        model: Sam,
        *,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
    ) -> None:
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        if points_per_side < 1 or points_per_batch < 1:
            raise ValueError(
                f"points_per_side and points_per_batch must be >= 1, got {points_per_side}, {points_per_batch}"
            )
        self.predictor = SamPredictor(model)
        self.point_grids = [
            build_point_grid(int(points_per_side / crop_n_points_downscale_factor**i)) for i in range(crop_n_layers + 1)
        ]
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode

    @torch.no_grad()
    def generate(self, image: Any) -> list[dict[str, Any]]:
        """Masks of an [H, W, 3] uint8 RGB numpy image (or uint8 [3, H, W] tensor).

        Returns one record per mask, ordered by the final NMS: segmentation, area, bbox (XYWH),
        predicted_iou, point_coords ([[x, y]]), stability_score, crop_box (XYWH).
        """
        image = image_to_tensor(image)
        h, w = int(image.shape[1]), int(image.shape[2])
        crops = generate_crop_boxes((h, w), self.crop_n_layers, self.crop_overlap_ratio)
        data = _cat([self._process_crop(image, box, layer) for box, layer in crops])
        if len(crops) > 1 and len(data["rles"]):
            # Prefer masks from smaller crops: they saw the object at a higher resolution.
            scores = 1 / box_area(data["crop_boxes"].float())
            keep = batched_nms(data["boxes"].float(), scores, torch.zeros_like(scores), self.crop_nms_thresh)
            data = _take(data, keep)
        if self.min_mask_region_area > 0:
            data = self._postprocess_small_regions(data, max(self.box_nms_thresh, self.crop_nms_thresh))
        return [self._record(data, i) for i in range(len(data["rles"]))]

    def _record(self, data: dict[str, Any], i: int) -> dict[str, Any]:
        rle = data["rles"][i]
        return {
            "segmentation": rle if self.output_mode == "coco_rle" else decode_rle(rle),
            "area": int(mask_utils.area(rle)),
            "bbox": _xywh(data["boxes"][i]),
            "predicted_iou": float(data["iou_preds"][i]),
            "point_coords": [data["points"][i].tolist()],
            "stability_score": float(data["stability_score"][i]),
            "crop_box": _xywh(data["crop_boxes"][i]),
        }

    def _process_crop(self, image: torch.Tensor, crop_box: tuple[int, int, int, int], layer: int) -> dict[str, Any]:
        x0, y0, x1, y1 = crop_box
        crop_size = (y1 - y0, x1 - x0)
        self.predictor.set_image(image[:, y0:y1, x0:x1])
        # Grid in crop pixels, then in model-input pixels (float64 like the official pipeline).
        points = self.point_grids[layer] * torch.tensor([crop_size[1], crop_size[0]], dtype=torch.float64)
        new_h, new_w = preprocess_shape(*crop_size, self.predictor.model.img_size)
        in_points = points * torch.tensor([new_w / crop_size[1], new_h / crop_size[0]], dtype=torch.float64)
        parts = [
            self._process_batch(
                points[s : s + self.points_per_batch],
                in_points[s : s + self.points_per_batch],
                crop_box,
                image.shape[1:],
            )
            for s in range(0, len(points), self.points_per_batch)
        ]
        self.predictor.reset_image()
        data = _cat(parts)
        keep = batched_nms(
            data["boxes"].float(), data["iou_preds"], torch.zeros_like(data["iou_preds"]), self.box_nms_thresh
        )
        data = _take(data, keep)
        data["boxes"] = data["boxes"] + torch.tensor([x0, y0, x0, y0])
        data["points"] = data["points"] + torch.tensor([x0, y0], dtype=torch.float64)
        data["crop_boxes"] = torch.tensor([crop_box], dtype=torch.int64).expand(len(data["rles"]), 4)
        return data

    def _process_batch(
        self,
        points: torch.Tensor,
        in_points: torch.Tensor,
        crop_box: tuple[int, int, int, int],
        image_size: tuple[int, ...],
    ) -> dict[str, Any]:
        """One batch of grid points [n, 2] (crop and model-input pixels) -> filtered records of 3n candidates."""
        device = self.predictor.device
        coords = in_points.to(device, torch.float32 if device.type == "mps" else torch.float64)[:, None, :]
        labels = torch.ones(coords.shape[0], 1, dtype=torch.int64, device=device)
        logits, iou, _ = self.predictor.predict_torch(coords, labels, multimask_output=True, return_logits=True)
        k = logits.shape[1]
        logits, iou = logits.flatten(0, 1), iou.flatten(0, 1)
        points = points.repeat_interleave(k, dim=0)

        keep = torch.ones_like(iou, dtype=torch.bool)
        if self.pred_iou_thresh > 0:
            keep &= iou > self.pred_iou_thresh
        logits, iou, points = logits[keep], iou[keep], points[keep.cpu()]
        threshold = self.predictor.model.mask_threshold
        stability = stability_score(logits, threshold, self.stability_score_offset)
        if self.stability_score_thresh > 0:
            keep = stability >= self.stability_score_thresh
            logits, iou, points, stability = logits[keep], iou[keep], points[keep.cpu()], stability[keep]
        masks = logits > threshold
        del logits
        boxes = masks_to_boxes(masks).long()  # int64 pixel indices, as the official batched_mask_to_box

        x0, y0, x1, y1 = crop_box
        h, w = int(image_size[0]), int(image_size[1])
        near = box_near_crop_edge(boxes + torch.tensor([x0, y0, x0, y0], device=boxes.device), crop_box, (0, 0, w, h))
        masks, boxes, iou, stability, points = (
            masks[~near],
            boxes[~near],
            iou[~near],
            stability[~near],
            points[~near.cpu()],
        )
        # Paste crop masks into the full image before encoding.
        masks = torch.nn.functional.pad(masks, (x0, w - x1, y0, h - y1))
        return {
            "rles": encode_masks(masks),
            "boxes": boxes.cpu(),
            "iou_preds": iou.float().cpu(),
            "stability_score": stability.float().cpu(),
            "points": points.cpu(),
        }

    def _postprocess_small_regions(self, data: dict[str, Any], nms_thresh: float) -> dict[str, Any]:
        """Clean small islands/holes; re-run NMS preferring untouched masks (changed ones may now duplicate)."""
        if not data["rles"]:
            return data
        masks, unchanged = [], []
        for rle in data["rles"]:
            mask, changed = remove_small_regions(decode_rle(rle), self.min_mask_region_area)
            masks.append(torch.from_numpy(mask))
            unchanged.append(float(not changed))
        stacked = torch.stack(masks)
        boxes = masks_to_boxes(stacked).long()
        scores = torch.tensor(unchanged)
        keep = batched_nms(boxes.float(), scores, torch.zeros_like(scores), nms_thresh)
        for i in keep.tolist():
            if not unchanged[i]:
                data["rles"][i] = encode_mask(stacked[i])
                data["boxes"][i] = boxes[i]
        return _take(data, keep)
