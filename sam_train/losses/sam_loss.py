"""SAM's training loss: 20 x focal + 1 x dice on the best mask, plus IoU-head regression.

Per object: single-output objects use mask token 0; multimask objects (a single click) use tokens
1..3 and only the mask with the lowest focal/dice loss is backpropagated, while the IoU head is
regressed on all three. Sums over objects are divided by `num_objects`, which the caller takes
from `sam_train.losses.distributed.global_num_objects` (no collectives in here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sam_train.losses.functional import dice_loss, focal_loss, iou_l1, iou_mse, mask_iou

RESOLUTIONS = ("low_res", "input")
IOU_LOSSES = {"mse": iou_mse, "l1": iou_l1}


@dataclass
class SamLossConfig:
    """Loss weights and options; defaults are the SAM paper's."""

    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    iou_loss: str = "mse"  # "mse" (SAM v1) or "l1" (SAM 2)
    # "low_res": loss on the 4h x 4w decoder logits, gt area-downsampled and thresholded at 0.5;
    # "input": logits bilinearly upsampled to the gt's S x S (16x the memory).
    resolution: str = "low_res"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    dice_eps: float = 1.0
    mask_threshold: float = 0.0  # logit threshold of the predicted mask in the IoU target

    def __post_init__(self) -> None:
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"SamLossConfig.resolution must be one of {RESOLUTIONS}, got {self.resolution!r}")
        if self.iou_loss not in IOU_LOSSES:
            raise ValueError(f"SamLossConfig.iou_loss must be one of {tuple(IOU_LOSSES)}, got {self.iou_loss!r}")
        for name in ("focal_weight", "dice_weight", "iou_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"SamLossConfig.{name} must be >= 0, got {getattr(self, name)}")


def resize_gt(gt_masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """bool [M, S, S] -> bool [M, h, w]: area-average, pixels at least half covered are foreground."""
    if tuple(gt_masks.shape[-2:]) == tuple(size):
        return gt_masks.bool()
    return F.interpolate(gt_masks[:, None].float(), size=size, mode="area")[:, 0] >= 0.5


def _candidates(multimask: torch.Tensor | bool, m: int, device: torch.device) -> torch.Tensor:
    """Token indices [M, k] competing per object: (1, 2, 3) for multimask objects, (0,) or (0, 0, 0) else."""
    multi = torch.tensor([1, 2, 3], device=device)
    if isinstance(multimask, bool):
        return multi.expand(m, 3) if multimask else torch.zeros(m, 1, dtype=torch.long, device=device)
    # Mixed batch: single objects repeat token 0 so every row has 3 candidates (argmin picks the first).
    return torch.where(multimask.to(device).reshape(m, 1), multi, torch.zeros_like(multi))


def sam_loss(
    low_res_logits: torch.Tensor,
    iou_pred: torch.Tensor,
    gt_masks: torch.Tensor,
    multimask: torch.Tensor | bool,
    num_objects: float | torch.Tensor,
    cfg: SamLossConfig | None = None,
) -> dict[str, torch.Tensor]:
    """SAM loss for one decoder pass over M objects.

    Args:
        low_res_logits: float [M, 4, h, w] all decoder tokens (0 single mask, 1..3 multimask).
        iou_pred: float [M, 4] predicted IoU of each token.
        gt_masks: bool [M, S, S] ground truth at model-input resolution (or already [M, h, w]).
        multimask: bool [M] per object, or one bool for all objects (avoids the mixed-batch path).
        num_objects: normaliser, the number of objects over all processes (divided by the world
            size when DDP averages gradients; see `global_num_objects`).
        cfg: weights and options.
    Returns:
        dict with scalar `loss` (weighted total), `focal`, `dice`, `iou` (unweighted terms, each
        summed over objects / num_objects) and `selected` int64 [M], the token index of the mask
        that was backpropagated (argmin of focal_weight * focal + dice_weight * dice).
    """
    cfg = cfg or SamLossConfig()
    if low_res_logits.dim() != 4 or low_res_logits.shape[1] != 4:
        raise ValueError(f"low_res_logits must be [M, 4, h, w] (all tokens), got {tuple(low_res_logits.shape)}")
    m = low_res_logits.shape[0]
    if iou_pred.shape != (m, 4):
        raise ValueError(f"iou_pred must be [M, 4] = [{m}, 4], got {tuple(iou_pred.shape)}")
    if gt_masks.dim() != 3 or gt_masks.shape[0] != m:
        raise ValueError(f"gt_masks must be bool [M, S, S] with M = {m}, got {tuple(gt_masks.shape)}")
    if isinstance(num_objects, (int, float)) and num_objects <= 0:
        raise ValueError(f"num_objects must be > 0, got {num_objects}")

    # fp32 losses under AMP: bf16 sigmoid/log terms lose the small focal values.
    if low_res_logits.element_size() < 4:
        low_res_logits, iou_pred = low_res_logits.float(), iou_pred.float()
    idx = _candidates(multimask, m, low_res_logits.device)  # [M, k]
    logits = torch.take_along_dim(low_res_logits, idx[:, :, None, None], dim=1)  # [M, k, h, w]
    ious = torch.take_along_dim(iou_pred, idx, dim=1)  # [M, k]
    if cfg.resolution == "input":
        logits = F.interpolate(logits, size=tuple(gt_masks.shape[-2:]), mode="bilinear", align_corners=False)
        gt = gt_masks.bool()[:, None]
    else:
        gt = resize_gt(gt_masks, tuple(logits.shape[-2:]))[:, None]  # [M, 1, h, w]

    focal = focal_loss(logits, gt, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma)  # [M, k]
    dice = dice_loss(logits, gt, eps=cfg.dice_eps)
    best = (cfg.focal_weight * focal + cfg.dice_weight * dice).detach().argmin(dim=1, keepdim=True)  # [M, 1]
    focal_best = torch.take_along_dim(focal, best, dim=1)[:, 0]
    dice_best = torch.take_along_dim(dice, best, dim=1)[:, 0]

    target = mask_iou(logits.detach() > cfg.mask_threshold, gt)  # [M, k], detached
    iou_err = IOU_LOSSES[cfg.iou_loss](ious, target)
    if isinstance(multimask, bool):
        iou_obj = iou_err.mean(dim=1)  # k = 3 (all multimask) or k = 1
    else:  # single objects' 3 candidates are copies of token 0: count it once
        iou_obj = torch.where(multimask.to(iou_err.device), iou_err.mean(dim=1), iou_err[:, 0])

    focal_t = focal_best.sum() / num_objects
    dice_t = dice_best.sum() / num_objects
    iou_t = iou_obj.sum() / num_objects
    loss = cfg.focal_weight * focal_t + cfg.dice_weight * dice_t + cfg.iou_weight * iou_t
    return {
        "loss": loss,
        "focal": focal_t,
        "dice": dice_t,
        "iou": iou_t,
        "selected": torch.take_along_dim(idx, best, dim=1)[:, 0],
    }
