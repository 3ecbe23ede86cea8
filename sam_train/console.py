"""What `sam-train` prints: one progress bar, our messages, warnings that matter, the result table.

Hydra's logging config (configs/hydra/job_logging/sam_train.yaml) sends every record to the run's log
file with time and logger name, and to the console through `QuietConsole` and `ConsoleFormatter`.
`quiet_console()` removes the handlers Lightning installs on its own loggers (each of its INFO lines
was printed twice, once by them and once by Hydra's root handler) and the warnings every run used to
print that a user can do nothing about.
"""

from __future__ import annotations

import logging
import warnings

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")

# (message regex, category): library chatter on every run, nothing a user can act on
QUIET_WARNINGS = (
    (r".*'set_vital' is deprecated", UserWarning),  # torchdata's StatefulDataLoader on torch >= 2.9
    (r".*isinstance\(treespec, LeafSpec\)", Warning),  # Lightning's pytree helper on torch >= 2.10
    (r".*ThroughputMonitor.*flops_per_batch", Warning),  # FLOPs vary per batch (objects x iterations)
    (r".*is smaller than the logging interval", Warning),  # step-based logging runs across short epochs
    (r"The `srun` command is available", Warning),  # Lightning's hint whenever Slurm is installed, in or out of a job
)


class QuietConsole(logging.Filter):
    """Drops Lightning's INFO lines (seed, GPU / TPU availability, tips, "max_steps reached") from the
    console, except those about checkpoints (restoring, resuming); they stay in the log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or not record.name.startswith(LIGHTNING_LOGGERS):
            return True
        return "checkpoint" in record.getMessage()


class ConsoleFormatter(logging.Formatter):
    """INFO as the bare message; other levels prefixed with the level (`WARNING: ...`)."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname}: {message}"


def quiet_console() -> None:
    """Let Lightning's loggers go through Hydra's handlers only, and silence QUIET_WARNINGS."""
    import lightning.pytorch  # noqa: F401  (installs its handlers on import: remove them after)

    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
