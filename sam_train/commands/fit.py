"""`sam-train fit`: train / fine-tune SAM from a composed config (configs/fit.yaml)."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sam_train.commands.build import (
    build_model,
    build_trainer,
    command_line,
    fit_or_requeue,
    prepare_run_dir,
    resume_checkpoint,
    scalar_metrics,
    seed_and_precision,
)
from sam_train.loggers import finish_loggers

log = logging.getLogger(__name__)


def build_sam_module(cfg: DictConfig) -> pl.LightningModule:
    """Model (weights loaded, fine-tuning strategy applied), then the LightningModule around it."""
    model = build_model(cfg)
    if cfg.get("compile"):  # the encoder dominates compute; the prompt loop has data-dependent shapes
        model.image_encoder = torch.compile(model.image_encoder)
    return instantiate(cfg.module, model=model)


def log_images(trainer: pl.Trainer, key: str, paths: list) -> None:
    """Send PNGs (e.g. evaluation overlays) to the loggers that take images (W&B)."""
    for logger in trainer.loggers:
        if paths and hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[str(p) for p in paths], step=trainer.global_step)


def evaluation_requested(cfg: DictConfig) -> bool:
    """cfg.evaluate is set and the command line did not remove it (`~evaluate`, `evaluate=null`): a recipe
    that sets some of its keys leaves a partial node behind when the group itself is removed."""
    removed = any(o.split("=", 1)[0] == "~evaluate" or o in ("evaluate=null", "evaluate=none") for o in command_line())
    return cfg.get("evaluate") is not None and not removed


def log_model_size(model: torch.nn.Module, name: str | None = None) -> None:
    """One line instead of Lightning's model summary table (trainer.enable_model_summary=true for it)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model: %s, %.2fM parameters, %.2fM trained", name or type(model).__name__, total / 1e6,
             trainable / 1e6)


def fit(cfg: DictConfig) -> dict[str, float]:
    """Train / fine-tune SAM as configured; returns the final logged metrics."""
    from sam_train.config_checks import check_values, explicit_keys, fit_warmup

    check_values(cfg)
    fit_warmup(cfg, explicit_keys(command_line()))  # before the run dir's config.yaml records the config
    seed_and_precision(cfg)
    run_dir = prepare_run_dir(cfg)
    datamodule = instantiate(cfg.data)
    module = build_sam_module(cfg)
    log_model_size(module.model, OmegaConf.select(cfg, "model.name"))
    trainer = build_trainer(cfg, run_dir)
    fit_or_requeue(trainer, module, datamodule, resume_checkpoint(cfg, run_dir))
    metrics = scalar_metrics(trainer)
    if evaluation_requested(cfg) and trainer.is_global_zero:
        from sam_train.commands.eval import evaluate_after_fit

        metrics.update(evaluate_after_fit(cfg, module.model, datamodule, run_dir))
        log_images(trainer, "eval/overlays", sorted((run_dir / "overlays").glob("*.png")))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
    finish_loggers(trainer.loggers)
    log.info("run directory: %s", run_dir)
    return metrics


main = fit
