"""Per-mask loss terms for SAM training: focal, dice, IoU and IoU-head regression.

All functions are pure and return one value per mask, [M, k], so callers can select, weight and
normalise (see `sam_train.losses.sam_loss`). Spatial inputs are [M, k, H, W]; targets may be
[M, k, H, W] or [M, 1, H, W] (broadcast over the k masks).
"""

from __future__ import annotations

import torch
from torchvision.ops import sigmoid_focal_loss


def _check(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if logits.dim() != 4:
        raise ValueError(f"logits must be [M, k, H, W], got shape {tuple(logits.shape)}")
    if targets.dim() != 4 or targets.shape[0] != logits.shape[0] or targets.shape[2:] != logits.shape[2:]:
        raise ValueError(
            f"targets must be [M, k or 1, H, W] matching logits {tuple(logits.shape)}, got {tuple(targets.shape)}"
        )
    return targets.to(logits.dtype).expand_as(logits)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al.), mean over pixels of each mask.

    Args:
        logits: float [M, k, H, W] mask logits.
        targets: [M, k or 1, H, W] binary (bool or 0/1 float) ground truth.
        alpha: weight of the positive class (-1: no weighting).
        gamma: focusing exponent.
    Returns:
        float [M, k].
    """
    targets = _check(logits, targets)
    return sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none").flatten(2).mean(-1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, *, eps: float = 1.0) -> torch.Tensor:
    """Soft dice loss 1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps), with p = sigmoid(logits).

    Args:
        logits: float [M, k, H, W].
        targets: [M, k or 1, H, W] binary ground truth.
        eps: smoothing added to numerator and denominator (SAM 2 uses 1).
    Returns:
        float [M, k].
    """
    targets = _check(logits, targets)
    p = logits.sigmoid().flatten(2)
    t = targets.flatten(2)
    return 1.0 - (2.0 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)


def mask_iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Intersection over union of binary masks; two empty masks count as IoU 1.

    Args:
        pred: bool [M, k, H, W] (or [M, H, W]).
        gt: bool of a shape broadcastable to pred ([M, 1, H, W] for [M, k, H, W] predictions).
    Returns:
        float32 [M, k] (or [M]).
    """
    pred, gt = torch.broadcast_tensors(pred.bool(), gt.bool())
    inter = (pred & gt).flatten(-2).sum(-1)
    union = (pred | gt).flatten(-2).sum(-1)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter, dtype=torch.float32)).float()


def iou_mse(iou_pred: torch.Tensor, iou_target: torch.Tensor) -> torch.Tensor:
    """Squared error of the IoU head, [M, k] -> [M, k]; the target is detached (SAM v1)."""
    return (iou_pred - iou_target.detach().to(iou_pred.dtype)) ** 2


def iou_l1(iou_pred: torch.Tensor, iou_target: torch.Tensor) -> torch.Tensor:
    """Absolute error of the IoU head, [M, k] -> [M, k]; the target is detached (SAM 2)."""
    return (iou_pred - iou_target.detach().to(iou_pred.dtype)).abs()
