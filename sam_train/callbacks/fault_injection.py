"""Deliberate faults for reliability tests and cluster drills (never enabled by default).

`sam-train fit +callbacks.fault._target_=sam_train.callbacks.FaultInjection +callbacks.fault.step=3 ...`
"""

from __future__ import annotations

import logging
from typing import Literal

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)

FaultKind = Literal["raise", "nan_grad"]


class InjectedFault(RuntimeError):
    """The error raised by FaultInjection(kind="raise")."""


class FaultInjection(pl.Callback):
    """Raises an error, or poisons the gradients with NaN, at one optimiser step on one rank (or all).

    Args:
        step: global step (0-based, the step being computed) at which the fault happens.
        kind: "raise" -> InjectedFault in on_train_batch_start; "nan_grad" -> every gradient set to NaN
            after backward (exercises NonFiniteGuard).
        rank: global rank that fails; None: every rank.
        times: for "nan_grad", how many consecutive steps from `step` are poisoned.
    """

    def __init__(self, *, step: int, kind: FaultKind = "raise", rank: int | None = None, times: int = 1) -> None:
        if kind not in ("raise", "nan_grad"):
            raise ValueError(f"FaultInjection.kind must be 'raise' or 'nan_grad', got {kind!r}")
        self.step, self.kind, self.rank, self.times = step, kind, rank, times

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
