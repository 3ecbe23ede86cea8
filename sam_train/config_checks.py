"""Value checks of the composed config, so a mistyped value is one line naming the key and what is valid
(`sam-train: error: trainer.max_steps: 'abc' is not valid; expected ...`) instead of a trace from deep
inside Lightning or the optimiser. Keys a config does not have are skipped."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from numbers import Real
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sam_train.errors import SamTrainError

log = logging.getLogger(__name__)

MAX_STEPS, WARMUP, TOTAL = "trainer.max_steps", "optim.scheduler.warmup_steps", "optim.scheduler.total_steps"


class ConfigError(SamTrainError, ValueError):
    """A config value of the wrong type or out of range; the message starts with its key."""


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def int_at_least(low: int, *, none: bool = False) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: (none and v is None) or (_int(v) and v >= low)), f"an integer >= {low}" + (
        " or null" if none else ""
    )


def positive_number() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _number(v) and v > 0), "a number > 0"


def number_at_least_zero(*, none: bool = False) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: (none and v is None) or (_number(v) and v >= 0)), "a number >= 0" + (" or null" if none else "")


def _steps_or_fraction(v: Any) -> bool:
    return v is None or (_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1)


# key -> (is valid, what is valid). Shared by every command: keys a config lacks are not checked.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": int_at_least(0),
    MAX_STEPS: (lambda v: _int(v) and (v >= 1 or v == -1), "an integer >= 1 (optimiser steps), or -1 for no limit"),
    "trainer.max_epochs": (lambda v: v is None or (_int(v) and v >= -1), "an integer >= 1, -1 or null"),
    "trainer.val_check_interval": (
        _steps_or_fraction, "an integer >= 1 (steps), a fraction in (0, 1] of an epoch, or null"
    ),
    "trainer.log_every_n_steps": int_at_least(1),
    "trainer.accumulate_grad_batches": int_at_least(1),
    "trainer.gradient_clip_val": number_at_least_zero(none=True),
    "trainer.limit_val_batches": (
        lambda v: v is None or (_int(v) and v >= 0) or (isinstance(v, float) and 0 <= v <= 1),
        "an integer >= 0 (batches), a fraction in [0, 1], or null",
    ),
    "optim.optimizer.lr": positive_number(),
    "optim.optimizer.weight_decay": number_at_least_zero(),
    WARMUP: int_at_least(0),
    "data.batch_size": int_at_least(1),
    "data.val_batch_size": int_at_least(1, none=True),
    "data.num_workers": int_at_least(0),
    "prompts.num_iterations": int_at_least(1),
    "prompts.num_mask_only": int_at_least(0),
    "prompts.loss_iterations": int_at_least(1, none=True),
    "loss.focal_weight": number_at_least_zero(),
    "loss.dice_weight": number_at_least_zero(),
    "loss.iou_weight": number_at_least_zero(),
    "callbacks.model_checkpoint.every_n_train_steps": int_at_least(0, none=True),
    "callbacks.epoch_checkpoint.every_n_epochs": int_at_least(1),
    "module.base_lr": positive_number(),
    "module.lr": (lambda v: v is None or (_number(v) and v > 0), "a number > 0 or null (base_lr scaling)"),
    "mae_data.batch_size": int_at_least(1),
}


def check_values(cfg: DictConfig) -> None:
    """Raise ConfigError for the first key of RULES whose value is of the wrong type or out of range."""
    for key, (valid, expected) in RULES.items():
        value = OmegaConf.select(cfg, key, default="<absent>", throw_on_missing=False)
        if isinstance(value, str) and value in ("<absent>", "???"):
            continue  # missing mandatory values have their own message
        if not valid(value):
            raise ConfigError(f"{key}: {value!r} is not valid; expected {expected}")


def explicit_keys(overrides: Iterable[str]) -> set[str]:
    """Keys set on the command line (`key=value`, `+key=value`, `++key=value`)."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}


def _run_length(cfg: DictConfig) -> tuple[Any, str]:
    """The steps the LR schedule gets to run, and the key that sets them: the schedule's own length
    (optim.scheduler.total_steps, usually ${trainer.max_steps}) or trainer.max_steps when that is shorter."""
    scheduler = cfg.optim.scheduler
    max_steps = OmegaConf.select(cfg, MAX_STEPS)
    if "total_steps" not in scheduler:
        return max_steps, MAX_STEPS
    raw = OmegaConf.to_container(scheduler, resolve=False).get("total_steps")
    total, key = scheduler.total_steps, MAX_STEPS if isinstance(raw, str) and "trainer.max_steps" in raw else TOTAL
    if _int(total) and _int(max_steps) and 1 <= max_steps < total:
        return max_steps, MAX_STEPS
    return total, key


def fit_warmup(cfg: DictConfig, explicit: set[str], *, apply: bool = True) -> None:
    """A warm-up at least as long as the run (or its schedule): shortened to a tenth of it (with a warning) when it came
    from a config or recipe, a ConfigError when the user set it on the command line too. With apply=False
    only the errors are raised (the CLI's up-front check; `fit` shortens it)."""
    scheduler = OmegaConf.select(cfg, "optim.scheduler")
    if not isinstance(scheduler, DictConfig) or "warmup_steps" not in scheduler:
        return
    total, total_key = _run_length(cfg)
    warmup = scheduler.warmup_steps
    if not _int(total) or total < 1:
        if "total_steps" in scheduler:
            raise ConfigError(f"{total_key}: {total!r} is not valid; the LR schedule needs its length, an integer >= 1")
        return  # no step limit (max_epochs): nothing to compare with
    if warmup < total:
        return
    if WARMUP in explicit:
        raise ConfigError(
            f"{WARMUP}: {warmup} warm-up steps do not fit in {total_key}={total}; "
            f"expected 0 <= {WARMUP} < {total_key}"
        )
    if not apply:
        return
    shortened = total // 10
    log.warning(
        "%s=%d is not below %s=%d: warm-up shortened to %d steps (a tenth of the run); set %s=<n < %d> to choose",
        WARMUP, warmup, total_key, total, shortened, WARMUP, total,
    )  # fmt: skip
    scheduler.warmup_steps = shortened
