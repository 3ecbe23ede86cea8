"""Experiment loggers: W&B that falls back to offline mode when no API key is configured, and a CSV logger
that keeps the rows of earlier runs in the same run directory when a run resumes."""

from __future__ import annotations

import csv
import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from sam_train.io import atomic_write

log = logging.getLogger(__name__)


def wandb_api_key_present() -> bool:
    """True when W&B can authenticate: WANDB_API_KEY (or an identity token file) or a `wandb login` entry
    in the netrc file. Reads files only: importing wandb here would set up its global settings before
    the logger chooses the mode, and the wandb client may contact the server."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


class SamWandbLogger(WandbLogger):
    """Lightning's WandbLogger, offline when asked (`mode="offline"`), with checkpoints still recorded as
    artifacts (W&B keeps them with the offline run and `wandb sync` uploads them)."""

    def __init__(self, *, offline_run: bool = False, **kwargs: Any) -> None:
        # Lightning refuses log_model with offline=True and only sets WANDB_MODE, which wandb 0.31 ignores
        # once its settings exist (it then asks for a key): the mode goes to wandb.init itself instead.
        # quiet: no W&B banner and history table on the console (the offline run's sync line is ours)
        kwargs.setdefault("settings", {"quiet": True})
        super().__init__(offline=False, **({"mode": "offline"} if offline_run else {}), **kwargs)
        self.offline_run = offline_run

    def finish(self) -> None:
        """End the W&B run (flushes it to disk); for an offline run, say how to upload it."""
        if self._experiment is None:
            return
        sync_dir = getattr(getattr(self._experiment, "settings", None), "sync_dir", None)
        self._experiment.finish()
        if self.offline_run and sync_dir:
            log.warning("W&B: offline run written to %s; upload it with: wandb sync %s", sync_dir, sync_dir)


def wandb_logger(
    *, project: str, name: str, save_dir: str, log_model: bool | str = True, **kwargs: Any
) -> SamWandbLogger:
    """A Lightning `WandbLogger` (rank-zero only); offline with a clear message when no key is set."""
    mode = os.environ.get("WANDB_MODE")
    offline = mode in ("offline", "dryrun") or (mode != "disabled" and not wandb_api_key_present())
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if offline and mode not in ("offline", "dryrun"):
        log.warning("W&B: no API key found (WANDB_API_KEY or `wandb login`), logging offline under %s/wandb", save_dir)
    return SamWandbLogger(
        project=project, name=name, save_dir=save_dir, log_model=log_model, offline_run=offline, **kwargs
    )


def finish_loggers(loggers: list[Any]) -> None:
    """End runs that need it (W&B); the others flush on their own."""
    for logger in loggers:
        if isinstance(logger, SamWandbLogger):
            logger.finish()


class _ResumingWriter(ExperimentWriter):
    """Lightning's CSV writer rewrites metrics.csv from scratch when a new process logs to it: a resumed
    run would erase the rows of the run it resumes. This one keeps them, except the rows of steps the
    resumed run computes again (those after its checkpoint), so every step appears once."""

    def __init__(self, log_dir: str) -> None:
        path = Path(log_dir) / self.NAME_METRICS_FILE
        self._previous: list[dict[str, str]] | None = None
        if path.is_file():
            with open(path, newline="") as f:
                self._previous = list(csv.DictReader(f))
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning warns it will delete the files; this class keeps them
        pass

    def save(self) -> None:
        if self._previous is None or not self.metrics:
            super().save()
            return
        first = min(int(m["step"]) for m in self.metrics)
        rows = [r for r in self._previous if r.get("step") and int(r["step"]) < first] + self.metrics
        self._previous, self.metrics = None, rows
        self._record_new_keys()

        def write(f) -> None:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)

        atomic_write(self.metrics_file_path, write, text=True)  # one rename: a kill never loses the old rows
        self.metrics = []


class ResumingCSVLogger(CSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` whose metrics.csv survives a resume (see _ResumingWriter)."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(log_dir=self.log_dir)
        return self._experiment
