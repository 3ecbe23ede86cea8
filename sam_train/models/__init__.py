"""SAM model parts, the model registry (ViT and TinyViT families) and checkpoint I/O."""

from sam_train.models.configs import PRETRAINED, SAM_CONFIGS, SamConfig, TinySamConfig, sam_config
from sam_train.models.registry import build_sam
from sam_train.models.sam import Sam

__all__ = ["PRETRAINED", "SAM_CONFIGS", "Sam", "SamConfig", "TinySamConfig", "build_sam", "sam_config"]
