"""Learning-rate schedules with linear warm-up: step (SAM paper), cosine, poly (SAMed).

Each returns a `LambdaLR` whose lambda is a `functools.partial` of a module-level function, so the
scheduler pickles (checkpoints, multiprocessing) and its factors are plain functions of the step.
The factor multiplies each group's initial lr (which already holds any layer-decay scale).
Warm-up: factor (step + 1) / warmup_steps for step < warmup_steps, so the first step trains.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _warmup(step: int, warmup_steps: int) -> float | None:
    return (step + 1) / warmup_steps if step < warmup_steps else None


def _progress(step: int, warmup_steps: int, total_steps: int) -> float:
    """Fraction of the post-warm-up steps done, 0 at the end of warm-up, 1 from total_steps on."""
    return min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))


def warmup_step_factor(step: int, *, warmup_steps: int, milestones: tuple[int, ...], gamma: float) -> float:
    """gamma ** (number of milestones <= step) after warm-up."""
    w = _warmup(step, warmup_steps)
    return w if w is not None else gamma ** bisect_right(milestones, step)


def warmup_cosine_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Half cosine from 1 at the end of warm-up to min_lr_ratio at total_steps (flat after)."""
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    progress = _progress(step, warmup_steps, total_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_poly_factor(step: int, *, warmup_steps: int, total_steps: int, power: float) -> float:
    """(1 - progress) ** power after warm-up (SAMed: power 0.9), 0 from total_steps on."""
    w = _warmup(step, warmup_steps)
    if w is not None:
        return w
    progress = _progress(step, warmup_steps, total_steps)
    return (1.0 - progress) ** power


def _check(warmup_steps: int, total_steps: int | None = None) -> None:
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps is not None and total_steps <= warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")


def warmup_step_schedule(
    optimizer: Optimizer, warmup_steps: int, milestones: Sequence[int], gamma: float = 0.1
) -> LambdaLR:
    """Linear warm-up, then lr x gamma at each milestone step (SAM: 250 warm-up, x0.1 at 60k and 86,666)."""
    _check(warmup_steps)
    fn = partial(warmup_step_factor, warmup_steps=warmup_steps, milestones=tuple(sorted(milestones)), gamma=gamma)
    return LambdaLR(optimizer, fn)


def warmup_cosine_schedule(
    optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warm-up, then cosine decay to min_lr_ratio x lr at total_steps."""
    _check(warmup_steps, total_steps)
    fn = partial(warmup_cosine_factor, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio)
    return LambdaLR(optimizer, fn)


def warmup_poly_schedule(optimizer: Optimizer, warmup_steps: int, total_steps: int, power: float = 0.9) -> LambdaLR:
    """Linear warm-up, then polynomial decay to 0 at total_steps (SAMed: 250 warm-up, power 0.9)."""
    _check(warmup_steps, total_steps)
    fn = partial(warmup_poly_factor, warmup_steps=warmup_steps, total_steps=total_steps, power=power)
    return LambdaLR(optimizer, fn)
