"""A wall-clock budget for a whole `fit`, data set-up and caching passes included.

Lightning's `trainer.max_time` (its Timer callback) counts only the time spent in the training loop, so a
run that first encodes its data set (cached embeddings) would overrun a budget such as "10 minutes on this
CPU". `WallClockBudget` counts from its own creation instead (when `fit` builds the trainer, before the data
are set up and cached): it stops training after the first optimiser step that ends past the budget, and
tells data modules how much time is left for caching. At that step boundary it writes last.ckpt (the
trained model and a resume point: the step checkpoints alone would leave it up to N steps short, and with
an annealed lr those are the steps that settle the model). With `anneal_lr` it also decays every learning rate
linearly to zero over the budget left when training starts ("Budgeted Training", Li et al., ICLR 2020): a
run cut by the clock ends on small steps, not on whatever the schedule's flat part gives its last step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

log = logging.getLogger(__name__)


def parse_duration(value: str | int | float | Mapping[str, Any] | None) -> float | None:
    """Lightning's max_time forms -> seconds: "DD:HH:MM:SS", seconds, or {"days": .., "hours": .., ...}."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Mapping):
        units = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}
        unknown = set(value) - set(units)
        if unknown:
            raise ValueError(f"max_time: unknown unit(s) {sorted(unknown)}; valid: {sorted(units)}")
        return float(sum(float(v) * units[k] for k, v in value.items()))
    parts = str(value).split(":")
    if len(parts) != 4:
        raise ValueError(f"max_time must be DD:HH:MM:SS (e.g. 00:00:10:00), got {value!r}")
    try:
        d, h, m, s = (float(p) for p in parts)
    except ValueError as exc:
        raise ValueError(f"max_time must be DD:HH:MM:SS (e.g. 00:00:10:00), got {value!r}") from exc
    return d * 86400 + h * 3600 + m * 60 + s


class WallClockBudget(pl.Callback):
    """Stop `fit` once `max_time` has passed since this callback was made (set-up and caching included).

    Args:
        max_time: the budget, in any form Lightning's `trainer.max_time` takes; None disables the callback.
        start: time.time() the budget counts from (default: now). Not the process start: a process that
            runs several fits (tests, sweeps, notebooks) would otherwise find the budget spent.
        anneal_lr: scale each optimiser step's learning rates (as the scheduler set them) by the fraction of
            the training time left, 1 at the first step to 0 at the deadline. It depends on the clock: a
            resumed run anneals over what is left of its own budget.
        filename: the checkpoint written (in the run's checkpoint folder) when the budget stops training;
            None writes none.
    """

    def __init__(self, *, max_time: str | int | float | Mapping[str, Any] | None = None,
                 start: float | None = None, anneal_lr: bool = False, filename: str | None = "last.ckpt") -> None:
        self.budget = parse_duration(max_time)
        self.filename = filename
        self.start = time.time() if start is None else float(start)
        self.anneal_lr = anneal_lr
        self.train_start: float | None = None
        self._scheduled: list[float] = []  # the lrs the scheduler set, restored after each step
        self._hooks: list[Any] = []

    def lr_scale(self, now: float | None = None) -> float:
        """Fraction of the training time left (1 without a budget or before training starts)."""
        if self.budget is None or self.train_start is None:
            return 1.0
        now = time.time() if now is None else now
        return min(1.0, max(0.0, (self.deadline - now) / max(self.deadline - self.train_start, 1e-6)))

    def _scale(self, optimizer: Any, *args: Any) -> None:
        self._scheduled = [group["lr"] for group in optimizer.param_groups]
        scale = self.lr_scale()
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * scale

    def _restore(self, optimizer: Any, *args: Any) -> None:
        for group, lr in zip(optimizer.param_groups, self._scheduled, strict=True):
            group["lr"] = lr

    @property
    def deadline(self) -> float | None:
        return None if self.budget is None else self.start + self.budget

    def elapsed(self) -> float:
        return time.time() - self.start

    def remaining(self) -> float | None:
        return None if self.budget is None else self.budget - self.elapsed()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.budget is None:
            return
        log.info("wall-clock budget %.0f s, %.0f s used before the first step (start-up, caching)%s",
                 self.budget, self.elapsed(), "; learning rates anneal to 0 at its end" if self.anneal_lr else "")
        self.train_start = time.time()
        for hook in self._hooks:  # a second fit with this callback
            hook.remove()
        self._hooks = []
        if self.anneal_lr:
            for optimizer in trainer.optimizers:  # pre / post hooks: composes with any scheduler
                self._hooks += [optimizer.register_step_pre_hook(self._scale),
                                optimizer.register_step_post_hook(self._restore)]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.budget is None:
            return
        pl_module.log("train/wall_s", self.elapsed(), on_step=True, on_epoch=False, batch_size=1)
        if self.anneal_lr:
            pl_module.log("train/lr_scale", self.lr_scale(), on_step=True, on_epoch=False, batch_size=1)
        over = trainer.strategy.reduce_boolean_decision(self.elapsed() >= self.budget, all=False)  # any rank
        if over and not trainer.should_stop:
            log.info("wall-clock budget of %.0f s reached after %d steps (%.0f s since the fit started)",
                     self.budget, trainer.global_step, self.elapsed())
            trainer.should_stop = True
            if self.filename is not None:  # every rank (the decision above is shared): rank 0 writes atomically
                from sam_train.callbacks.checkpoint_io import checkpoint_dir  # callbacks import this module

                trainer.save_checkpoint(checkpoint_dir(trainer) / self.filename, weights_only=False)


def budget_of(trainer: pl.Trainer) -> WallClockBudget | None:
    """The trainer's WallClockBudget with a budget, if any (the earliest deadline when there are several)."""
    budgets = [c for c in trainer.callbacks if isinstance(c, WallClockBudget) and c.budget is not None]
    return min(budgets, key=lambda c: c.deadline) if budgets else None
