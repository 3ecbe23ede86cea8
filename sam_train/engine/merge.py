"""Mask-set arithmetic of the data engine, on COCO RLEs (pycocotools): overlaps, de-duplication,
matching against ground truth, and the semi-automatic merge of model proposals into existing labels.

All functions take compressed RLEs ({"size": [H, W], "counts": str | bytes}) so large images with
hundreds of masks stay small; `sam_train.data.rle.encode_masks` converts bool masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from sam_train.data.rle import decode_rle, encode_mask, rle_bytes

Rle = dict[str, Any]


def from_rles(rles: Sequence[Rle], size: tuple[int, int]) -> torch.Tensor:
    """N RLEs -> bool [N, H, W] (an empty [0, H, W] tensor for no RLEs)."""
    if not rles:
        return torch.zeros(0, *size, dtype=torch.bool)
    return torch.from_numpy(np.stack([decode_rle(r) for r in rles]))


def areas(rles: Sequence[Rle]) -> np.ndarray:
    """[N] pixel counts."""
    return np.asarray(mask_utils.area([rle_bytes(r) for r in rles]), dtype=np.int64) if rles else np.zeros(0, np.int64)


def iou_matrix(a: Sequence[Rle], b: Sequence[Rle]) -> np.ndarray:
    """[len(a), len(b)] mask IoU (pycocotools; both empty -> 0)."""
    if not a or not b:
        return np.zeros((len(a), len(b)))
    ious = mask_utils.iou([rle_bytes(r) for r in a], [rle_bytes(r) for r in b], [0] * len(b))
    return np.asarray(ious, dtype=np.float64)


def covered_fraction(rle: Rle, cover: Rle | None) -> float:
    """|rle n cover| / |rle|: how much of a mask is already claimed by `cover` (0 for no cover)."""
    area = float(mask_utils.area(rle_bytes(rle)))
    if cover is None or area == 0:
        return 0.0
    return float(mask_utils.area(mask_utils.merge([rle_bytes(rle), rle_bytes(cover)], intersect=True))) / area


def union(rles: Sequence[Rle]) -> Rle | None:
    """One RLE of the union of masks (None for no masks)."""
    if not rles:
        return None
    return mask_utils.merge([rle_bytes(r) for r in rles], intersect=False)


def subtract(rle: Rle, cover: Rle | None) -> Rle:
    """rle minus cover (pixels of `cover` removed), as a str-counts RLE."""
    if cover is None:
        return rle
    mask = decode_rle(rle) & ~decode_rle(cover)
    return encode_mask(mask)


def dedup(rles: Sequence[Rle], scores: Sequence[float], *, iou_thresh: float) -> list[int]:
    """Greedy mask NMS: indices (best score first) of masks whose IoU with every kept one is <= iou_thresh.

    AMG's NMS compares boxes; this removes near-duplicate masks whose boxes differ (e.g. after
    small-region clean-up) and is what "near-duplicate" means in `autolabel`.
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ious = iou_matrix(rles, rles)
    kept: list[int] = []
    for i in order.tolist():
        if all(ious[i, j] <= iou_thresh for j in kept):
            kept.append(i)
    return kept


@dataclass
class MergeResult:
    """Outcome of `merge_proposals`: the existing masks (unchanged, first) then the accepted proposals.

    Attributes:
        rles: existing RLEs followed by the accepted (possibly trimmed) proposal RLEs.
        model_made: one flag per entry of `rles`: False for existing masks, True for proposals.
        accepted: indices into the proposals of the accepted ones, in the order they were appended.
        rejected: {proposal index: reason} for the others.
    """

    rles: list[Rle]
    model_made: list[bool]
    accepted: list[int]
    rejected: dict[int, str]


def merge_proposals(
    existing: Sequence[Rle],
    proposals: Sequence[Rle],
    scores: Sequence[float],
    *,
    max_overlap: float = 0.1,
    min_area: int = 1,
    trim: bool = True,
) -> MergeResult:
    """Semi-automatic stage: add confident model masks where nothing is labelled yet.

    Proposals are visited best score first. One is rejected when more than `max_overlap` of its area
    lies on pixels already claimed by an existing mask or an already accepted proposal (so it can
    neither duplicate nor overwrite a label), or when it is smaller than `min_area` after trimming.
    With `trim`, accepted proposals lose the (at most `max_overlap`) pixels they share with earlier
    masks, so every pixel keeps the label it had. Existing masks are returned unchanged and first.
    """
    if len(scores) != len(proposals):
        raise ValueError(f"scores ({len(scores)}) and proposals ({len(proposals)}) must have the same length")
    if not 0.0 <= max_overlap < 1.0:
        raise ValueError(f"max_overlap must be in [0, 1), got {max_overlap}")
    claimed = union(existing)
    out, flags = list(existing), [False] * len(existing)
    accepted: list[int] = []
    rejected: dict[int, str] = {}
    for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable").tolist():
        rle = proposals[i]
        overlap = covered_fraction(rle, claimed)
        if overlap > max_overlap:
            rejected[i] = f"overlaps labelled pixels ({overlap:.2f} > max_overlap {max_overlap})"
            continue
        if trim:
            rle = subtract(rle, claimed)
        area = int(mask_utils.area(rle_bytes(rle)))
        if area < min_area:
            rejected[i] = f"area {area} < min_area {min_area}"
            continue
        out.append(rle)
        flags.append(True)
        accepted.append(i)
        claimed = union([c for c in (claimed, rle) if c is not None])
    return MergeResult(rles=out, model_made=flags, accepted=accepted, rejected=rejected)


def match_scores(pred: Sequence[Rle], gt: Sequence[Rle], *, iou_thresh: float = 0.5) -> dict[str, float]:
    """Object recall / precision of predicted masks against known objects at a mask-IoU threshold.

    One-to-one greedy matching (highest IoU first), as detection metrics do: a ground-truth object
    is recalled if a distinct prediction overlaps it with IoU >= iou_thresh.
    Returns {"tp", "num_pred", "num_gt", "recall", "precision"}.
    """
    ious = iou_matrix(pred, gt)
    tp = 0
    if ious.size:
        pairs = sorted(((ious[p, g], p, g) for p in range(len(pred)) for g in range(len(gt))), reverse=True)
        used_p: set[int] = set()
        used_g: set[int] = set()
        for v, p, g in pairs:
            if v < iou_thresh:
                break
            if p not in used_p and g not in used_g:
                used_p.add(p)
                used_g.add(g)
                tp += 1
    return {
        "tp": tp,
        "num_pred": len(pred),
        "num_gt": len(gt),
        "recall": tp / len(gt) if gt else float("nan"),
        "precision": tp / len(pred) if pred else float("nan"),
    }
