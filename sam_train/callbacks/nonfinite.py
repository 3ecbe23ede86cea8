"""Skip optimiser steps whose loss or gradients are not finite; stop after too many in a row."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch

from sam_train.callbacks.checkpoint_io import checkpoint_dir
from sam_train.errors import SamTrainError

log = logging.getLogger(__name__)


class NonFiniteError(SamTrainError, RuntimeError):
    """Training produced non-finite losses / gradients for too many consecutive steps."""


def _grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return True
    # one fused reduction instead of a host sync per tensor: the norm of a non-finite tensor is non-finite
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack(norms)).all())


class NonFiniteGuard(pl.Callback):
    """Drops the update of a step with a NaN / inf loss or gradient, counts it and logs the batch ids.

    The gradients of a bad step are set to None right before `optimizer.step()`, so the optimiser leaves
    the parameters and its moments untouched (the LR schedule still advances one step). The counter is
    logged as `train/skipped_steps`. After `max_consecutive` bad steps in a row, the current (last good)
    state is saved to `<checkpoint dir>/<filename>` and training stops with a NonFiniteError naming it.

    With a GradScaler (precision=16-mixed) an overflowing gradient is the scaler's normal business (it
    skips the step and lowers the scale), so only non-finite losses are counted there.

    Args:
        max_consecutive: consecutive bad steps that stop training (>= 1).
        check_gradients: also check the gradients (one fused norm per step), not only the loss.
        filename: checkpoint of the last good state written before stopping.
    """

    def __init__(self, *, max_consecutive: int = 5, check_gradients: bool = True, filename: str = "last_good.ckpt"):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.check_gradients = check_gradients
        self.filename = filename
        self.skipped = 0
        self.consecutive = 0
        self._loss_bad = False
        self._loss_value = math.nan
        self._ids: list[str] = []

    # counters survive a resume
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict["skipped"])
        self.consecutive = int(state_dict["consecutive"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if isinstance(batch, dict) and "ids" in batch:
            self._ids.extend(map(str, batch["ids"]))

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if not finite:
            self._loss_bad = True
            self._loss_value = float(loss.detach().float().reshape(-1)[0])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        loss_bad, ids, loss_value = self._loss_bad, self._ids, self._loss_value
        self._loss_bad, self._ids, self._loss_value = False, [], math.nan
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        grads_bad = self.check_gradients and scaler is None and not _grads_finite(optimizer)
        bad = torch.tensor(float(loss_bad or grads_bad), device=pl_module.device)
        if trainer.world_size > 1:  # every rank must take the same decision (and all save together)
            bad = trainer.strategy.reduce(bad, reduce_op="max")
        if not bool(bad):
            self.consecutive = 0
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # optimisers skip parameters without a gradient: no update, no moment change
        self.skipped += 1
        self.consecutive += 1
        what = "loss" if loss_bad else "gradient" if grads_bad else "loss/gradient on another rank"
        log.warning(
            "rank %d step %d: non-finite %s (loss=%s), optimiser step skipped (%d skipped in total, %d in a row); "
            "batch ids: %s",
            trainer.global_rank,
            trainer.global_step,
            what,
            loss_value,
            self.skipped,
            self.consecutive,
            ids,
        )
        pl_module.log("train/skipped_steps", float(self.skipped), rank_zero_only=True)
        if self.consecutive >= self.max_consecutive:
            path = checkpoint_dir(trainer) / self.filename
            trainer.save_checkpoint(path, weights_only=False)  # parameters are still those of the last good step
            raise NonFiniteError(
                f"{self.consecutive} consecutive optimiser steps with a non-finite {what} (last at step "
                f"{trainer.global_step}, batch ids {ids}); stopped after NonFiniteGuard.max_consecutive="
                f"{self.max_consecutive}. The last good state is saved in {path}. Lower the learning rate, "
                f"check the data of these samples, or use bf16 instead of fp16."
            )
