"""Preemption: on SIGTERM / SIGUSR1, checkpoint at the next step boundary, requeue under Slurm, exit 75.

The flow (every rank, DDP included):
1. The signal handler only sets a flag. Nothing else may happen inside a handler: the signal can land
   half-way through an optimiser step, or while this rank sits in a collective that the other ranks
   will never join (Lightning 2.6's Slurm auto-requeue saves its hpc checkpoint inside the handler and
   deadlocks DDP that way, Lightning-AI/pytorch-lightning#21406; its SIGTERM handler broadcasts).
   So this callback *replaces* Lightning's SIGTERM / SIGUSR1 handlers while training, never chains to
   them, and `sam_train.commands.build.build_trainer` runs Slurm jobs with `SLURMEnvironment(auto_requeue=False)`.
2. At the end of every training batch the ranks agree on the flags: one tiny all-reduce (max), so a
   signal seen by any rank stops all of them at the same step. (A single process also checks after
   every validation batch; in DDP a signal during validation is handled after it, at the next step.)
3. All ranks write `<checkpoint dir>/last.ckpt` together (rank 0 writes it atomically, then a barrier):
   model, optimiser, scheduler, loops and data-loader position of a finished step.
4. Under Slurm, for a requeue signal (SIGUSR1: `#SBATCH --signal=SIGUSR1@90` before the time limit,
   or `scancel --signal=USR1 <job>`), rank 0 runs `scontrol requeue <job id>`; the other ranks wait
   for it (a broadcast), so srun's --kill-on-bad-exit cannot stop rank 0 before the job is requeued.
   SIGTERM never requeues: it is `scancel`, the time limit itself, or Slurm's own preemption (which
   requeues by itself where configured).
5. Training stops before the next step / validation with `Preempted`, a SystemExit with code
   EXIT_REQUEUE = 75 (BSD's EX_TEMPFAIL, "try again later"); the step's metrics are logged first.
   Requeued job, or the same command run again: `sam-train fit` resumes from last.ckpt.

If the signal step is the last one (max_steps), training just finishes (exit 0, no requeue).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sam_train.callbacks.checkpoint_io import checkpoint_dir

log = logging.getLogger(__name__)

EXIT_REQUEUE = 75  # sysexits.h EX_TEMPFAIL; Slurm: `RequeueExit=75` in slurm.conf requeues on it too


class Preempted(SIGTERMException):
    """Training stopped on a preemption signal after saving a checkpoint; exits with EXIT_REQUEUE."""

    def __init__(self, message: str, code: int = EXIT_REQUEUE) -> None:
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes for this Slurm batch job (`<array job>_<task>` in a job array), or
    None outside a Slurm batch job (no srun task, or an interactive allocation Lightning ignores)."""
    if not SLURMEnvironment.detect():
        return None
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job:
        return f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job(job_id: str, *, timeout_s: float = 60.0) -> bool:
    """Runs `scontrol requeue <job_id>`; True on success. Failures are logged with scontrol's reason
    (e.g. the job was submitted with --no-requeue), never raised: the checkpoint is already saved."""
    if not re.fullmatch(r"[0-9]+(_[0-9]+)?", job_id):
        log.error("not requeueing: %r is not a Slurm job id", job_id)
        return False
    command = ["scontrol", "requeue", job_id]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:  # no scontrol on this node / controller unreachable
        log.error("`%s` failed: %s; resubmit the job to resume from the checkpoint", " ".join(command), exc)
        return False
    if result.returncode != 0:
        log.error(
            "`%s` failed (exit %d): %s; resubmit the job to resume from the checkpoint",
            " ".join(command), result.returncode, (result.stderr or result.stdout).strip(),
        )  # fmt: skip
        return False
    log.warning("requeued Slurm job %s: it restarts from the checkpoint once this run has exited", job_id)
    return True


class PreemptionCheckpoint(pl.Callback):
    """Saves `last.ckpt` at the step boundary after SIGTERM / SIGUSR1, requeues the Slurm job on
    SIGUSR1, and exits with `exit_code` (see the module docstring for the whole flow).

    Args:
        signals: names of the signals handled (SIGUSR1 is Slurm's `--signal` warning before the time
            limit; SIGTERM comes from `scancel`, preemption, Kubernetes, `kill`).
        requeue_signals: the subset of `signals` after which a Slurm batch job is requeued with
            `scontrol requeue` (outside Slurm every signal just saves and exits).
        filename: checkpoint written in the ModelCheckpoint's directory (else `<root>/checkpoints`);
            `last.ckpt` is what `sam-train fit` resumes from.
        exit_code: the process exit code after the checkpoint is saved.
        requeue_timeout_s: how long `scontrol requeue` may take before it counts as failed.
    """

    def __init__(
        self,
        *,
        signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"),
        requeue_signals: tuple[str, ...] = ("SIGUSR1",),
        filename: str = "last.ckpt",
        exit_code: int = EXIT_REQUEUE,
        requeue_timeout_s: float = 60.0,
    ) -> None:
        unknown = [s for s in (*signals, *requeue_signals) if not isinstance(getattr(signal, s, None), signal.Signals)]
        if unknown:
            raise ValueError(f"PreemptionCheckpoint: unknown signal name(s) {unknown}")
        self.signals = tuple(signal.Signals[s] for s in signals)
        self.requeue_signals = tuple(signal.Signals[s] for s in requeue_signals)
        self.filename = filename
        self.exit_code = exit_code
        self.requeue_timeout_s = requeue_timeout_s
        self.received: int | None = None  # the first signal received
        self._requeue_wanted = False  # a requeue signal was received
        self._message: str | None = None  # set once the preemption checkpoint is written
        self._stop = False  # raise Preempted at the next hook
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    # ------------------------------------------------------------------ signal handling
    def _handler(self, signum: int, frame: Any) -> None:
        # Only flags here (see the module docstring). Forked data-loader workers inherit this handler:
        # they ignore the signal, the main process stops them when it exits.
        if os.getpid() != self._pid:
            return
        if self.received is None:
            log.warning("received %s: saving a checkpoint at the next step boundary", signal.Signals(signum).name)
            self.received = signum
        self._requeue_wanted |= signum in self.requeue_signals

    def _install(self) -> None:
        # Runs after Lightning registered its handlers (just before sanity check / training): replace them.
        self._pid = os.getpid()
        for signum in self.signals:
            if signal.getsignal(signum) == self._handler:
                continue
            try:
                previous = signal.signal(signum, self._handler)
            except ValueError:  # not the main thread: leave signals to Lightning
                continue
            self._previous.setdefault(signum, previous)

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._message, self._stop = None, False
        self._install()

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
    def _agreed(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[bool, bool]:
        """(stop, requeue) agreed by all ranks: any rank's flag counts (they see signals at different times)."""
        stop = self.received is not None or trainer.received_sigterm
        flags = torch.tensor([float(stop), float(self._requeue_wanted)], device=pl_module.device)
        if trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags, reduce_op="max")
        return bool(flags[0]), bool(flags[1])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if self._message is not None:
            return
        stop, requeue = self._agreed(trainer, pl_module)
        if not stop:
            return
        self._message = self._save(trainer)
        finished = 0 < trainer.max_steps <= trainer.global_step
        if finished:  # that was the last step anyway: let training end normally (exit 0)
            log.warning("the preemption signal came in the last step: finishing normally")
            return
        if requeue:
            self._message += self._requeue(trainer)
        self._stop = True
        # No raise here: Lightning still logs this step's metrics; the next hook below raises Preempted.

    def _requeue(self, trainer: pl.Trainer) -> str:
        """Rank 0 requeues the Slurm job; every rank waits for it. Returns a note for the exit message."""
        job_id = slurm_job_id()
        if job_id is None:
            return ""
        requeued = requeue_slurm_job(job_id, timeout_s=self.requeue_timeout_s) if trainer.is_global_zero else False
        # A collective after scontrol: no rank exits (and srun --kill-on-bad-exit ends rank 0) before it ran.
        requeued = trainer.strategy.broadcast(requeued, src=0)
        if requeued:
            return f"; Slurm job {job_id} requeued"
        return f"; `scontrol requeue {job_id}` failed (see the error above): resubmit to resume"

    def _exit_if_preempted(self) -> None:
        if self._stop:
            assert self._message is not None
            raise Preempted(self._message, self.exit_code)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        self._exit_if_preempted()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit_if_preempted()  # no validation after the preemption checkpoint: exit promptly

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit_if_preempted()  # before the next epoch's data loaders start

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        # A signal during a (long) validation inside fit: save the training state now, mid-validation
        # (validation does not change it; on resume Lightning finishes the interrupted validation).
        # Single process only: DDP ranks may run different numbers of validation batches (iterable
        # shards), so a per-batch collective could hang; there the next training step boundary saves.
        if trainer.world_size > 1 or trainer.sanity_checking or trainer.state.fn != "fit" or self._message:
            return
        stop, requeue = self._agreed(trainer, pl_module)
        if stop:
            self._message = self._save(trainer) + (self._requeue(trainer) if requeue else "")
            self._stop = True
            self._exit_if_preempted()

    def _save(self, trainer: pl.Trainer) -> str:
        path = checkpoint_dir(trainer) / self.filename
        trainer.save_checkpoint(path, weights_only=False)  # every rank: rank 0 writes (atomically), then a barrier
        name = signal.Signals(self.received).name if self.received is not None else "SIGTERM"
        message = (
            f"preempted ({name} on rank {trainer.global_rank}): checkpoint saved at step {trainer.global_step} "
            f"in {path}; exiting with code {self.exit_code}; run the same command again to resume"
        )
        log.warning(message)
        return message
