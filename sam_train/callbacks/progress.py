"""One progress bar over the whole run's optimiser steps, not one per epoch.

Training is step-based (`trainer.max_steps`, `max_epochs: -1`), and Lightning's bar restarts every
epoch under the title `Epoch 39/-2`; this one counts optimiser steps to the end of the run and shows the
epoch beside it, with the loss and the last validation metrics (the `prog_bar` ones). Under a wall-clock
budget (`trainer.max_time`) the total is the number of steps the budget still buys at the rate measured so
far, so the bar reads "40/40 0:02:00 • 0:00:00" instead of "40/100000 ... 3 days".
"""

from __future__ import annotations

import math
import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, Timer

from sam_train.wall_clock import budget_of


def remaining_seconds(trainer: pl.Trainer) -> float | None:
    """Seconds left of the run's wall-clock budget: our WallClockBudget (`trainer.max_time` of fit, caching
    included) or Lightning's Timer (`Trainer(max_time=...)`, as distill's stages use); None without one."""
    left = [b.remaining() for b in [budget_of(trainer)] if b is not None]
    left += [t.time_remaining() for t in trainer.callbacks if isinstance(t, Timer) and t.time_remaining() is not None]
    return min(left) if left else None


class StepProgressBar(RichProgressBar):
    """RichProgressBar with one task for the whole run: optimiser steps done / to do, titled by the epoch."""

    _first: tuple[int, float] | None = None  # (global step, time) at the first step of this process

    def _steps_total(self) -> int | float:
        total = self.trainer.estimated_stepping_batches  # optimiser steps: max_steps, or epochs x batches
        total = total if math.isfinite(total) else self.total_train_batches
        remaining = remaining_seconds(self.trainer)
        if remaining is None or self._first is None:
            return total
        step, (step0, t0) = self.trainer.global_step, self._first
        if step <= step0:
            return total
        rate = (step - step0) / max(time.time() - t0, 1e-6)
        return min(total, step + math.ceil(max(remaining, 0.0) * rate))

    def _get_train_description(self, current_epoch: int) -> str:
        return f"epoch {current_epoch}"

    def _themed(self, description: str) -> str:  # as RichProgressBar._add_task styles it
        return f"[{self.theme.description}]{description}" if self.theme.description else description

    def _initialize_train_progress_bar_id(self) -> None:
        self.train_progress_bar_id = self._add_task(
            self._steps_total(), self._get_train_description(self.trainer.current_epoch)
        )
        self._update(self.train_progress_bar_id, self.trainer.global_step)  # a resumed run starts where it was

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_disabled or self.progress is None:
            return
        if self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        else:  # same bar: only the epoch in its title changes
            description = self._themed(self._get_train_description(trainer.current_epoch))
            self.progress.update(self.train_progress_bar_id, description=description)
        self.refresh()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        if self._first is None:
            self._first = (trainer.global_step, time.time())
        if not self.is_disabled and self.progress is not None and remaining_seconds(trainer) is not None:
            self.progress.update(self.train_progress_bar_id, total=self._steps_total())
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
