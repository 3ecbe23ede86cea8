"""Preemption: on SIGTERM / SIGUSR1, checkpoint at the next step boundary and exit with EXIT_REQUEUE.

What Lightning already does (2.6, kept as is):
- SIGTERM sets `trainer.received_sigterm`; the loops then raise `SIGTERMException` (a SystemExit whose
  code is 0) at the next batch boundary, without saving anything.
- Under Slurm (`SLURMEnvironment(auto_requeue=True)`, detected automatically), SIGUSR1 makes Lightning
  write `hpc_ckpt_<n>.ckpt` from inside the signal handler and run `scontrol requeue <job>`.

What this callback adds: on SIGTERM or SIGUSR1 it writes `<checkpoint dir>/last.ckpt` at the end of the
optimiser step during which the signal arrived (a consistent state: model, optimiser, scheduler, loops,
data-loader position; never mid-step), on every rank at the same step. Training then stops: SIGTERM
through Lightning's own SIGTERMException (after the step's metrics are logged), SIGUSR1 through
`Preempted` before the next step. `sam_train.train.fit` turns both into exit code EXIT_REQUEUE = 75
(BSD's EX_TEMPFAIL, "try again later"). Running the same command again resumes from last.ckpt.
Lightning's Slurm handler (hpc checkpoint + `scontrol requeue`) still runs: this callback chains to it.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

EXIT_REQUEUE = 75  # sysexits.h EX_TEMPFAIL; Slurm: `RequeueExit=75` in slurm.conf requeues on it


class Preempted(SIGTERMException):
    """Training stopped on a preemption signal after saving a checkpoint; exits with EXIT_REQUEUE."""

    def __init__(self, message: str, code: int = EXIT_REQUEUE) -> None:
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PreemptionCheckpoint(pl.Callback):
    """Saves `last.ckpt` at the step boundary after SIGTERM / SIGUSR1 and exits with `exit_code`.

    Args:
        signals: names of the signals handled (SIGUSR1 is Slurm's `--signal` warning before the time
            limit; SIGTERM comes from `scancel`, preemption, Kubernetes, `kill`).
        filename: checkpoint written in the ModelCheckpoint's directory (else `<root>/checkpoints`);
            `last.ckpt` is what `sam-train fit` resumes from.
        exit_code: the process exit code after the checkpoint is saved.
    """

    def __init__(
        self,
        *,
        signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"),
        filename: str = "last.ckpt",
        exit_code: int = EXIT_REQUEUE,
    ) -> None:
        unknown = [s for s in signals if not hasattr(signal, s)]
        if unknown:
            raise ValueError(f"PreemptionCheckpoint: unknown signal name(s) {unknown}")
        self.signals = tuple(getattr(signal, s) for s in signals)
        self.filename = filename
        self.exit_code = exit_code
        self.received: int | None = None
        self._message: str | None = None  # set once the preemption checkpoint is written
        self._previous: dict[int, Any] = {}

    # ------------------------------------------------------------------ signal handling
    def _handler(self, signum: int, frame: Any) -> None:
        # Only a flag here: saving inside a handler could catch the optimiser half-way through a step.
        if self.received is None:
            log.warning("received %s: saving a checkpoint at the next step boundary", signal.Signals(signum).name)
        self.received = signum
        previous = self._previous.get(signum)
        if callable(previous):  # Lightning's handlers (SIGTERM flag, Slurm requeue) keep working
            previous(signum, frame)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registers its handlers just before the training loop starts: chain after them.
        self.received, self._message = None, None
        for signum in self.signals:
            try:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handler)
            except ValueError:  # not the main thread: leave signals to Lightning
                self._previous.pop(signum, None)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) != self._handler:
                continue  # Lightning already restored its originals
            try:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            except ValueError:
                pass
        self._previous = {}

    # ------------------------------------------------------------------ step boundary
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        flag = torch.tensor(float(self.received is not None or trainer.received_sigterm), device=pl_module.device)
        if trainer.world_size > 1:  # ranks get the signal at slightly different times: agree on the step
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        if bool(flag) and self._message is None:
            self._message = self._save(trainer)
        # No raise here: Lightning still logs this step's metrics, then raises SIGTERMException itself
        # (SIGTERM), or on_train_batch_start raises Preempted before the next step (SIGUSR1).

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        if self._message is not None:
            raise Preempted(self._message, self.exit_code)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # SIGTERM during validation (Lightning raises SIGTERMException there): save then too; in DDP only
        # where every rank is known to stop at the same point.
        if not isinstance(exception, SIGTERMException) or self._message is not None:
            return
        if trainer.world_size == 1:
            self._message = self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> str:
        path = self._checkpoint_dir(trainer) / self.filename
        trainer.save_checkpoint(path)
        name = signal.Signals(self.received).name if self.received is not None else "SIGTERM"
        message = (
            f"preempted ({name} on rank {trainer.global_rank}): checkpoint saved at step {trainer.global_step} "
            f"in {path}; exiting with code {self.exit_code}; run the same command again to resume"
        )
        log.warning(message)
        return message

    def _checkpoint_dir(self, trainer: pl.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        if callback is not None and getattr(callback, "dirpath", None):
            return Path(callback.dirpath)
        return Path(trainer.default_root_dir) / "checkpoints"
