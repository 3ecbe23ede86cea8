"""Prompt simulation: points, boxes and the interactive training loop (pure tensor functions)."""

from sam_train.prompts.boxes import expand_boxes_uniform, jitter_boxes, masks_to_boxes
from sam_train.prompts.interactive import PromptSimulationConfig, SimulationResult, iteration_schedule, simulate
from sam_train.prompts.points import center_points, error_regions, sample_error_points, sample_points

__all__ = [
    "PromptSimulationConfig",
    "SimulationResult",
    "center_points",
    "error_regions",
    "expand_boxes_uniform",
    "iteration_schedule",
    "jitter_boxes",
    "masks_to_boxes",
    "sample_error_points",
    "sample_points",
    "simulate",
]
