"""Logs the bad samples the training datasets skipped (per source file) as training metrics."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl

log = logging.getLogger(__name__)


def _skip_counters(dataset: Any) -> list[Any]:
    """SkipCounters (`.skips`) of a dataset and of the datasets it wraps (ConcatDataset, Subset, ...)."""
    found, stack, seen = [], [dataset], set()
    while stack:
        ds = stack.pop()
        if ds is None or id(ds) in seen:
            continue
        seen.add(id(ds))
        if hasattr(getattr(ds, "skips", None), "summary"):
            found.append(ds.skips)
        stack.extend(getattr(ds, "datasets", []) or [])
        stack.append(getattr(ds, "dataset", None))
    return found


class SkipMonitor(pl.Callback):
    """Logs `data/skipped` and `data/skip_fraction` every `every_n_steps` steps and, at each epoch end,
    the skip counts per source file (warning). The limit itself (`max_skip_fraction` of the dataset's
    SkipCounter) is enforced where samples are read and raises a DataError naming the files.

    Counts are those of the main process: with `num_workers > 0` each worker counts (and enforces the
    limit) on its own and logs every skip as a warning.
    """

    def __init__(self, *, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps

    def _counters(self, trainer: pl.Trainer) -> list[Any]:
        datamodule = trainer.datamodule
        return _skip_counters(getattr(datamodule, "train", None)) if datamodule is not None else []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps <= 0 or trainer.global_step % self.every_n_steps:
            return
        counters = self._counters(trainer)
        if counters:
            seen = sum(c.seen for c in counters)
            skipped = sum(c.skipped for c in counters)
            pl_module.log("data/skipped", float(skipped), rank_zero_only=True)
            pl_module.log("data/skip_fraction", skipped / max(seen, 1), rank_zero_only=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        by_source: dict[str, int] = {}
        for counter in self._counters(trainer):
            for source, n in counter.summary()["by_source"].items():
                by_source[source] = by_source.get(source, 0) + n
        if by_source:
            log.warning("epoch %d: skipped bad samples per file: %s", trainer.current_epoch, by_source)
