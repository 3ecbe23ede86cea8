"""`sam-train pretrain`: MAE pretraining of a SAM image encoder (configs/pretrain.yaml).

Run directory, trainer, loggers, callbacks and resumption as `fit` (`commands.build`); the model is
`cfg.mae_model` (a `MaskedAutoencoderViT`), the data `cfg.mae_data` (an `ImageOnlyDataModule`) and the
LightningModule `cfg.module` (`MaeModule`). Export the result with
`sam-train export mae-to-sam checkpoint=<run_dir>/checkpoints/last.ckpt ...`.
"""

from __future__ import annotations

import logging

from hydra.utils import instantiate
from omegaconf import DictConfig

from sam_train.commands.build import (
    build_trainer,
    check_required,
    fit_or_requeue,
    prepare_run_dir,
    resume_checkpoint,
    scalar_metrics,
    seed_and_precision,
)
from sam_train.loggers import finish_loggers

log = logging.getLogger(__name__)


def pretrain(cfg: DictConfig) -> dict[str, float]:
    """MAE-pretrain as configured; returns the final logged metrics (e.g. train/loss)."""
    check_required(cfg)
    seed_and_precision(cfg)
    run_dir = prepare_run_dir(cfg)
    datamodule = instantiate(cfg.mae_data)
    module = instantiate(cfg.module, model=instantiate(cfg.mae_model))
    trainer = build_trainer(cfg, run_dir)
    # weights_only: resuming never unpickles code (the optimiser betas are plain lists, see pretrain.yaml)
    fit_or_requeue(trainer, module, datamodule, resume_checkpoint(cfg, run_dir))
    metrics = scalar_metrics(trainer)
    finish_loggers(trainer.loggers)
    last = run_dir / "checkpoints" / "last.ckpt"
    log.info(
        "run directory: %s; turn it into a SAM encoder with: sam-train export mae-to-sam checkpoint=%s "
        "out=%s sam_name=<vit_t|vit_b|vit_l|vit_h matching %s>",
        run_dir,
        last,
        run_dir / "sam_init.pth",
        cfg.mae_model.name,
    )
    return metrics


main = pretrain
