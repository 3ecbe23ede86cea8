"""One progress bar over the whole run's optimiser steps, not one per epoch.

Training is step-based (`trainer.max_steps`, `max_epochs: -1`), and Lightning's bar restarts every
epoch under the title `Epoch 39/-2`; this one counts optimiser steps to the end of the run and shows the
epoch beside it, with the loss and the last validation metrics (the `prog_bar` ones).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """RichProgressBar with one task for the whole run: optimiser steps done / to do, titled by the epoch."""

    def _steps_total(self) -> int | float:
        total = self.trainer.estimated_stepping_batches  # optimiser steps: max_steps, or epochs x batches
        return total if math.isfinite(total) else self.total_train_batches

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
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
