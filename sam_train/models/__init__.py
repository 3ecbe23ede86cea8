"""SAM model parts, the size registry and checkpoint I/O."""

from sam_train.models.registry import SAM_CONFIGS, SamConfig, build_sam, sam_config
from sam_train.models.sam import Sam

__all__ = ["SAM_CONFIGS", "Sam", "SamConfig", "build_sam", "sam_config"]
