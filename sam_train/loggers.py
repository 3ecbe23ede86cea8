"""Experiment loggers: W&B that falls back to offline mode when no API key is configured."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


def wandb_api_key_present() -> bool:
    """True when W&B can authenticate: WANDB_API_KEY or a stored login (netrc / settings)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import wandb

        return bool(wandb.Api(api_key=None, timeout=1).api_key)  # reads netrc / settings, no network
    except Exception:  # no key anywhere -> wandb raises a UsageError
        return False


def wandb_logger(*, project: str, name: str, save_dir: str, log_model: bool | str = True, **kwargs: Any) -> WandbLogger:
    """A Lightning `WandbLogger` (rank-zero only); offline with a clear message when no key is set."""
    offline = os.environ.get("WANDB_MODE") in ("offline", "disabled") or not wandb_api_key_present()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        project=project, name=name, save_dir=save_dir, offline=offline,
        log_model=False if offline else log_model, **kwargs,
    )
    if offline:
        log.warning(
            "W&B: no API key found, logging offline to %s/wandb; upload later with `wandb sync %s/wandb/offline-run-*`",
            save_dir,
            save_dir,
        )
    return logger
