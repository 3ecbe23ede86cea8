"""SAM training losses: per-mask terms, the combined SAM loss, the DDP normaliser."""

from sam_train.losses.distributed import global_num_objects
from sam_train.losses.functional import dice_loss, focal_loss, iou_l1, iou_mse, mask_iou
from sam_train.losses.sam_loss import SamLossConfig, sam_loss

__all__ = [
    "SamLossConfig",
    "dice_loss",
    "focal_loss",
    "global_num_objects",
    "iou_l1",
    "iou_mse",
    "mask_iou",
    "sam_loss",
]
