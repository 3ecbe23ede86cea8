"""Library entry points behind the CLI: `fit(cfg)` trains SAM from a composed Hydra config."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from sam_train.errors import SamTrainError
from sam_train.loggers import finish_loggers

log = logging.getLogger(__name__)


def prepare_run_dir(cfg: DictConfig) -> Path:
    """Create the run directory and write the resolved config into it."""
    run_dir = Path(cfg.run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    return run_dir


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """`ckpt_path=` if given (must exist), else the run directory's last checkpoint, else None."""
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise SamTrainError(f"ckpt_path={path}: no such checkpoint file")
        return str(path)
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("resuming from %s", last)
        return str(last)
    return None


def build_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    from lightning.pytorch.callbacks import ProgressBar

    from sam_train.callbacks import StepProgressBar

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    # not a config node: Lightning refuses a progress-bar callback when trainer.enable_progress_bar=false
    if cfg.trainer.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(StepProgressBar())
    return callbacks


def build_loggers(cfg: DictConfig) -> list[Any]:
    return [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]


def build_plugins() -> list[Any]:
    """Atomic checkpoint writes / weights_only reads; in a Slurm batch job, Slurm's environment without
    Lightning's auto-requeue, whose SIGUSR1 handler saves inside the signal handler and can deadlock DDP
    (PreemptionCheckpoint saves at the step boundary and runs `scontrol requeue` instead)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from sam_train.callbacks import AtomicCheckpointIO

    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def build_trainer(cfg: DictConfig, run_dir: Path) -> pl.Trainer:
    loggers = build_loggers(cfg)
    for logger in loggers:  # the resolved config, so every run on W&B / TensorBoard says how it was made
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return instantiate(
        cfg.trainer,
        default_root_dir=str(run_dir),
        logger=loggers or False,
        callbacks=build_callbacks(cfg),
        plugins=build_plugins(),
    )


def log_images(trainer: pl.Trainer, key: str, paths: list[Path]) -> None:
    """Send PNGs (e.g. evaluation overlays) to the loggers that take images (W&B)."""
    for logger in trainer.loggers:
        if paths and hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[str(p) for p in paths], step=trainer.global_step)


def build_sam_module(cfg: DictConfig) -> pl.LightningModule:
    """Model (weights loaded), fine-tuning strategy applied, then the LightningModule around it."""
    model = instantiate(cfg.model)
    if cfg.get("finetune") is not None:
        model = instantiate(cfg.finetune)(model)
    if cfg.get("compile"):  # the encoder dominates compute; the prompt loop has data-dependent shapes
        model.image_encoder = torch.compile(model.image_encoder)
    return instantiate(cfg.module, model=model)


def command_line() -> list[str]:
    """The overrides the user gave on the command line (empty outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def evaluation_requested(cfg: DictConfig) -> bool:
    """cfg.evaluate is set and the command line did not remove it (`~evaluate`, `evaluate=null`): a recipe
    that sets some of its keys leaves a partial node behind when the group itself is removed."""
    removed = any(o.split("=", 1)[0] == "~evaluate" or o in ("evaluate=null", "evaluate=none") for o in command_line())
    return cfg.get("evaluate") is not None and not removed


def log_model_size(model: torch.nn.Module, cfg: DictConfig) -> None:
    """One line instead of Lightning's model summary table (trainer.enable_model_summary=true for it)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    name = OmegaConf.select(cfg, "model.name") or type(model).__name__
    log.info("model: %s, %.2fM parameters, %.2fM trained", name, total / 1e6, trainable / 1e6)


def fit(cfg: DictConfig) -> dict[str, float]:
    """Train / fine-tune SAM as configured; returns the final logged metrics."""
    from sam_train.config_checks import check_values, explicit_keys, fit_warmup

    check_values(cfg)
    fit_warmup(cfg, explicit_keys(command_line()))  # before the run dir's config.yaml records the config
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("matmul_precision") and torch.cuda.is_available():  # TF32 on GPUs; on CPUs it only slows down
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    run_dir = prepare_run_dir(cfg)
    datamodule = instantiate(cfg.data)
    module = build_sam_module(cfg)
    log_model_size(module.model, cfg)
    trainer = build_trainer(cfg, run_dir)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg, run_dir), weights_only=True)
    except SIGTERMException as exc:  # preempted (SIGTERM / SIGUSR1): rerunning the command resumes
        from sam_train.callbacks import EXIT_REQUEUE

        raise SystemExit(exc.code if isinstance(exc.code, int) and exc.code else EXIT_REQUEUE) from exc
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if evaluation_requested(cfg) and trainer.is_global_zero:
        from sam_train.eval.run import evaluate_after_fit

        metrics.update(evaluate_after_fit(cfg, module.model, datamodule, run_dir))
        log_images(trainer, "eval/overlays", sorted((run_dir / "overlays").glob("*.png")))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
    finish_loggers(trainer.loggers)
    log.info("run directory: %s", run_dir)
    return metrics
