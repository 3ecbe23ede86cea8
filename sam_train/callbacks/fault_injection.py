"""Deliberate faults for reliability tests and cluster drills (never enabled by default).

`sam-train fit +callbacks.fault._target_=sam_train.callbacks.FaultInjection +callbacks.fault.step=3 ...`
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Literal

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)

FaultKind = Literal["raise", "nan_grad", "signal"]


class InjectedFault(RuntimeError):
    """The error raised by FaultInjection(kind="raise")."""


class FaultInjection(pl.Callback):
    """Raises an error, poisons the gradients with NaN, or sends this process a signal, at one optimiser
    step on one rank (or all).

    Args:
        step: global step (0-based, the step being computed) at which the fault happens.
        kind: "raise" -> InjectedFault in on_train_batch_start; "nan_grad" -> every gradient set to NaN
            after backward (exercises NonFiniteGuard); "signal" -> `os.kill(own pid, signal_name)` in the
            middle of the step (after backward, before the optimiser update): SIGKILL, SIGTERM, SIGUSR1.
        rank: global rank that fails; None: every rank.
        times: for "nan_grad", how many consecutive steps from `step` are poisoned.
    """

    def __init__(
        self,
        *,
        step: int,
        kind: FaultKind = "raise",
        rank: int | None = None,
        times: int = 1,
        signal_name: str = "SIGTERM",
    ) -> None:
        if kind not in ("raise", "nan_grad", "signal"):
            raise ValueError(f"FaultInjection.kind must be 'raise', 'nan_grad' or 'signal', got {kind!r}")
        if not hasattr(signal, signal_name):
            raise ValueError(f"FaultInjection.signal_name: unknown signal {signal_name!r}")
        self.step, self.kind, self.rank, self.times = step, kind, rank, times
        self.signal = getattr(signal, signal_name)

    def _active(self, trainer: pl.Trainer) -> bool:
        on_rank = self.rank is None or trainer.global_rank == self.rank
        return on_rank and self.step <= trainer.global_step < self.step + self.times

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.kind == "raise" and self._active(trainer):
            raise InjectedFault(f"injected fault at step {trainer.global_step} on rank {trainer.global_rank}")

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.kind == "nan_grad" and self._active(trainer):
            log.warning("injecting NaN gradients at step %d on rank %d", trainer.global_step, trainer.global_rank)
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.fill_(torch.nan)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.kind == "signal" and self._active(trainer):
            log.warning("sending %s to this process at step %d", signal.Signals(self.signal).name, trainer.global_step)
            os.kill(os.getpid(), self.signal)
