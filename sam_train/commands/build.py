"""Composed config -> objects, one way each: the model (weights + fine-tuning strategy), the device, the
run directory and the Lightning trainer of `fit`, `pretrain` and `distill`.

Only `sam_train.commands` (with `cli` and `config_checks`) reads Hydra / OmegaConf configs; the library
below it takes typed arguments.
"""

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
from sam_train.models.sam import Sam

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- device
def device(name: str | None = "auto") -> torch.device:
    """The device of a command's `device=` key: auto (or null) = cuda when available, else cpu; any torch
    device name otherwise (cuda without CUDA is a one-line error)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SamTrainError(f"device={name}: CUDA is not available on this machine (use device=cpu)")
    return dev


# ----------------------------------------------------------------------------------- model
def checkpoint_of(cfg: DictConfig) -> str | None:
    """The weights a command loads: `checkpoint=` (after the fine-tune strategy), else `model.checkpoint`."""
    return cfg.get("checkpoint") or OmegaConf.select(cfg, "model.checkpoint") or None


def build_model(cfg: DictConfig, *, require_weights: bool = False) -> Sam:
    """cfg.model built (its own `model.checkpoint` loaded by `build_sam`), cfg.finetune applied (LoRA /
    adapters must exist before their weights load), then the weights of `checkpoint=` if the config has one
    (any layout `load_sam_weights` reads: a fit run's Lightning .ckpt, official, MedSAM, HF, safetensors).

    require_weights: a one-line error when neither `checkpoint=` nor the model config gives weights.
    """
    from sam_train.models.checkpoint import load_sam_weights

    checkpoint = cfg.get("checkpoint")
    if require_weights and not checkpoint and not cfg.model.get("checkpoint") and not cfg.model.get("pretrained"):
        raise SamTrainError("checkpoint=<path> is required (a fit run's .ckpt or a SAM checkpoint), "
                            "or a model with bundled weights (model=lite_medsam)")
    if checkpoint and not Path(checkpoint).exists():
        raise SamTrainError(f"checkpoint={checkpoint}: no such file")
    model = instantiate(cfg.model)
    if cfg.get("finetune") is not None:
        model = instantiate(cfg.finetune)(model)
    if checkpoint:
        fmt = load_sam_weights(model, checkpoint)
        log.info("loaded %s (%s)", checkpoint, fmt)
    return model


def inference_model(cfg: DictConfig) -> Sam:
    """`build_model` on the command's `device=`, in eval mode (autolabel, annotate, embed)."""
    return build_model(cfg).to(device(cfg.get("device"))).eval()


# ----------------------------------------------------------------------------------- run set-up
def check_required(cfg: DictConfig) -> None:
    """Fail with one clear line when a mandatory value (`???`, e.g. mae_data.root) was not given."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise SamTrainError(
            f"missing required value(s): {', '.join(missing)}; set them on the command line, e.g. "
            f"{missing[0]}=/path/to/images"
        )


def seed_and_precision(cfg: DictConfig) -> None:
    """Seed everything (workers too); TF32 matmuls on GPUs when `matmul_precision` is set (on CPUs "high"
    made the tiny MAE step ~2x slower, measured, so CPUs keep full fp32)."""
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("matmul_precision") and torch.cuda.is_available():
        torch.set_float32_matmul_precision(cfg.matmul_precision)


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


# ----------------------------------------------------------------------------------- trainer
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
    """cfg.trainer with the run's loggers (given the resolved config), callbacks and plugins."""
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


def fit_or_requeue(trainer: pl.Trainer, module: pl.LightningModule, datamodule: Any, ckpt_path: str | None) -> None:
    """`trainer.fit` (weights_only resumption: never unpickles code); preempted (SIGTERM / SIGUSR1): exit
    with the requeue code, rerunning the command resumes."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException as exc:
        from sam_train.callbacks import EXIT_REQUEUE

        raise SystemExit(exc.code if isinstance(exc.code, int) and exc.code else EXIT_REQUEUE) from exc


def scalar_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The trainer's final logged scalars as floats."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}


def command_line() -> list[str]:
    """The overrides the user gave on the command line (empty outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
