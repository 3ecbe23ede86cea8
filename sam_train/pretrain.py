"""Library entry point behind `sam-train pretrain`: MAE pretraining of a SAM image encoder.

`pretrain(cfg)` mirrors `sam_train.train.fit`: run directory, trainer, loggers, callbacks and
resumption come from the same helpers; the model is `cfg.mae_model` (a `MaskedAutoencoderViT`), the
data `cfg.mae_data` (an `ImageOnlyDataModule`) and the LightningModule `cfg.module` (`MaeModule`).
Export the result with `sam-train export mae-to-sam checkpoint=<run_dir>/checkpoints/last.ckpt ...`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from sam_train.errors import SamTrainError
from sam_train.loggers import finish_loggers
from sam_train.train import build_trainer, prepare_run_dir, resume_checkpoint

log = logging.getLogger(__name__)


def check_required(cfg: DictConfig) -> None:
    """Fail with one clear line when a mandatory value (`???`, e.g. mae_data.root) was not given."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise SamTrainError(
            f"missing required value(s): {', '.join(missing)}; set them on the command line, e.g. "
            f"{missing[0]}=/path/to/images"
        )


def pretrain(cfg: DictConfig) -> dict[str, float]:
    """MAE-pretrain as configured; returns the final logged metrics (e.g. train/loss)."""
    check_required(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("matmul_precision") and torch.cuda.is_available():
        # TF32 on GPUs; on CPUs "high" made the tiny MAE step ~2x slower (measured), so CPUs keep full fp32.
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    run_dir = prepare_run_dir(cfg)
    datamodule = instantiate(cfg.mae_data)
    module = instantiate(cfg.module, model=instantiate(cfg.mae_model))
    trainer = build_trainer(cfg, run_dir)
    # weights_only: resuming never unpickles code (the optimiser betas are plain lists, see pretrain.yaml)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg, run_dir), weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
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


def mni_demo_image_folder(
    out_dir: str | Path,
    *,
    msd_dir: str | Path,
    subset: str = "train",
    val_fraction: float = 0.34,
    split_seed: int = 0,
) -> str:
    """Write the MNI152 demo's slices as PNGs into `out_dir` (once) and return it: an image folder for
    MAE pretraining on the same images the medical demo fine-tunes on.

    The MSD data set is prepared in `msd_dir` (`sam_train.data.demo.prepare_mni_demo`); `subset`,
    `val_fraction` and `split_seed` select cases exactly as configs/data/mni_demo.yaml does, so the
    default (train) never shows the held-out cases to the encoder.
    """
    from sam_train.data.synthetic import mni_demo_slices

    out = Path(out_dir)
    done = out / ".complete"
    if done.is_file():
        return str(out)
    out.mkdir(parents=True, exist_ok=True)
    slices = mni_demo_slices(root=msd_dir, subset=subset, val_fraction=val_fraction, split_seed=split_seed)
    for i in range(len(slices)):
        sample = slices[i]  # image uint8 [3, H, W]
        name = str(sample["id"]).replace("/", "_")
        Image.fromarray(sample["image"].permute(1, 2, 0).numpy()).save(out / f"{name}.png")
    done.write_text(f"{len(slices)} slices of {msd_dir} ({subset})\n")
    log.info("wrote %d %s slices of the MNI demo to %s", len(slices), subset, out)
    return str(out)
