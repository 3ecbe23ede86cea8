"""last.ckpt at the end of every epoch and after the run's final step, written at the step boundary."""

from __future__ import annotations

import lightning.pytorch as pl

from sam_train.callbacks.checkpoint_io import checkpoint_dir


class EpochEndCheckpoint(pl.Callback):
    """Saves `<checkpoint dir>/<filename>` after the last optimiser step of every `every_n_epochs`-th epoch,
    and after the step that reaches `trainer.max_steps`.

    Why not ModelCheckpoint(save_on_train_epoch_end=True): Lightning 2.6 resumes a checkpoint written in
    `on_train_epoch_end` with the sampler one epoch ahead (it sets the epoch from a progress counter that
    is already incremented there), so the resumed run would not see the same batches. Saved here, at the
    same point as the step checkpoints, the resume is exact. The final step: ModelCheckpoint saves last.ckpt
    at the end of training only if it never saved before, so a finished run's last.ckpt could be a few
    steps short of the trained model (and a rerun would train those steps again).
    """

    def __init__(self, *, every_n_epochs: int = 1, filename: str = "last.ckpt") -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.filename = filename

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        epoch_end = last and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        final = 0 < trainer.max_steps <= trainer.global_step
        if epoch_end or final:
            path = checkpoint_dir(trainer) / self.filename
            trainer.save_checkpoint(path, weights_only=False)  # full state (optimiser, loops): a resume point
