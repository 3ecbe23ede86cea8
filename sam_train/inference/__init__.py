"""Inference on trained SAMs: the interactive predictor and automatic mask generation (as segment-anything)."""

from sam_train.inference.amg import AutomaticMaskGenerator
from sam_train.inference.predictor import SamPredictor

__all__ = ["AutomaticMaskGenerator", "SamPredictor"]
