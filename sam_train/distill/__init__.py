"""Distillation of a SAM image encoder into a smaller one (`sam-train distill`): MobileSAM's embedding
matching, EfficientSAM's SAMI, a fine-tuning stage with the teacher's decoder, a held-out report."""

from sam_train.distill.data import DistillDataModule, UnlabelledImageFolder, collate_distill
from sam_train.distill.losses import embedding_mse, masked_feature_mse
from sam_train.distill.models import check_compatible, with_teacher_decoder
from sam_train.distill.module import DistillModule

__all__ = [
    "DistillDataModule",
    "DistillModule",
    "UnlabelledImageFolder",
    "check_compatible",
    "collate_distill",
    "embedding_mse",
    "masked_feature_mse",
    "with_teacher_decoder",
]
