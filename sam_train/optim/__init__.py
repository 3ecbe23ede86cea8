"""Optimisation helpers: parameter groups (no-decay, layer decay) and warm-up schedules."""

from sam_train.optim.param_groups import NO_DECAY_KEYWORDS, param_groups
from sam_train.optim.schedules import warmup_cosine_schedule, warmup_poly_schedule, warmup_step_schedule

__all__ = [
    "NO_DECAY_KEYWORDS",
    "param_groups",
    "warmup_cosine_schedule",
    "warmup_poly_schedule",
    "warmup_step_schedule",
]
