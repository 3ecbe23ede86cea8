"""Thin LightningModule for MAE pretraining: masked-patch MSE, MAE's optimiser recipe, reconstruction images."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from torchvision.utils import make_grid

from sam_train.data.image_only import IMAGENET_MEAN, IMAGENET_STD
from sam_train.models.checkpoint import strip_wrapper_names
from sam_train.models.mae import MaskedAutoencoderViT
from sam_train.optim.param_groups import no_decay_names
from sam_train.optim.schedules import warmup_cosine_schedule
from sam_train.seeding import derive_seed, seed_global_rngs

log = logging.getLogger(__name__)

OptimizerFactory = Callable[..., torch.optim.Optimizer]
# MAE's optimiser: AdamW with beta2 0.95 (lr and weight decay are set per param group at build time).
MAE_ADAMW: OptimizerFactory = partial(torch.optim.AdamW, betas=(0.9, 0.95))


def reconstruction_grid(
    model: MaskedAutoencoderViT,
    imgs: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Image grid in [0, 1], [3, H', W']: row 1 originals, row 2 masked inputs (hidden patches grey),
    row 3 reconstructions (visible patches from the input, hidden ones predicted).

    Args:
        imgs: [B, 3, S, S] normalised inputs; pred: [B, N, p*p*3] decoder output; mask: [B, N] (1 = hidden).
    """
    imgs, pred, mask = imgs.detach().float(), pred.detach().float(), mask.detach().float()
    if model.norm_pix_loss:  # predictions are per-patch normalised: undo with the true patch statistics
        patches = model.patchify(imgs)
        pred = pred * (patches.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + patches.mean(dim=-1, keepdim=True)
    mean_t = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)
    original = (imgs * std_t + mean_t).clamp(0, 1)
    recon = (model.unpatchify(pred) * std_t + mean_t).clamp(0, 1)
    hidden = model.unpatchify(mask[..., None].expand(-1, -1, pred.shape[-1]))
    masked = original * (1 - hidden) + 0.5 * hidden
    pasted = original * (1 - hidden) + recon * hidden
    return make_grid(torch.cat([original, masked, pasted]), nrow=imgs.shape[0], padding=2, pad_value=1.0)


class MaeModule(pl.LightningModule):
    """Pretrains a `MaskedAutoencoderViT` on batches of images [B, 3, S, S] (or (images, ...) tuples).

    Args:
        model: the MAE.
        optimizer: partial optimiser taking param groups and `lr` (default AdamW, betas (0.9, 0.95)).
        base_lr: lr per 256 images; lr = base_lr x effective batch / 256, where effective batch =
            world size x per-device batch x gradient accumulation (MAE's linear scaling rule).
        lr: absolute lr; overrides the scaling rule when set.
        weight_decay: decay of weights; norms, biases, class/mask tokens and position embeddings get none.
        warmup_steps: linear warm-up optimiser steps; default `warmup_fraction` of all steps. The
            schedule is `sam_train.optim.warmup_cosine_schedule`: its warm-up factor is
            (step + 1) / warmup_steps, so the first step already trains, one step ahead of MAE's
            per-iteration ramp from 0 (immaterial over thousands of warm-up steps).
        warmup_fraction: warm-up share when `warmup_steps` is None (MAE: 40 of 800 epochs = 0.05).
        min_lr: lr at the end of the cosine decay.
        batch_size: per-device batch; default: the datamodule's `batch_size` or the train loader's.
        image_log_every_n_steps: log a reconstruction grid every N optimiser steps (0 = never).
        num_log_images: images per reconstruction grid.
        pixel_mean, pixel_std: normalisation of the inputs (to display them).
        seed: base seed of the per-step masking generator.
    """

    def __init__(
        self,
        *,
        model: MaskedAutoencoderViT,
        optimizer: OptimizerFactory = MAE_ADAMW,
        base_lr: float = 1.5e-4,
        lr: float | None = None,
        weight_decay: float = 0.05,
        warmup_steps: int | None = None,
        warmup_fraction: float = 0.05,
        min_lr: float = 0.0,
        batch_size: int | None = None,
        image_log_every_n_steps: int = 500,
        num_log_images: int = 8,
        pixel_mean: Sequence[float] = IMAGENET_MEAN,
        pixel_std: Sequence[float] = IMAGENET_STD,
        seed: int = 0,
    ) -> None:
        super().__init__()
        # Only plain values in the checkpoint: it must stay loadable with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["model", "optimizer"], logger=False)
        self.model = model
        self.optimizer_factory = optimizer
        self.base_lr, self.lr, self.weight_decay = base_lr, lr, weight_decay
        self.warmup_steps, self.warmup_fraction, self.min_lr = warmup_steps, warmup_fraction, min_lr
        self.batch_size = batch_size
        self.image_log_every_n_steps, self.num_log_images = image_log_every_n_steps, num_log_images
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        self.seed = seed
        # Decided before any wrapping: FSDP flattens parameters, hiding their shapes from later code.
        # MAE's rule: 1-D parameters and the model's no_weight_decay() names (no keyword / module rules).
        self.no_decay_names = no_decay_names(model, keywords=(), modules=())
        self._last_image_step = -1

    # ------------------------------------------------------------------ steps
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:  # drop path: exact after a resume
        seed_global_rngs(derive_seed(self.seed, self.global_rank, 2, self.global_step, batch_idx))

    def training_step(self, batch: torch.Tensor | Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        imgs = batch if isinstance(batch, torch.Tensor) else batch[0]  # (images, labels) from class folders
        gen = torch.Generator(device=self.device)
        gen.manual_seed(derive_seed(self.seed, self.global_rank, self.global_step, batch_idx))
        loss, pred, mask = self.model(imgs, generator=gen)
        self.log("train/loss", loss, prog_bar=True, batch_size=imgs.shape[0])
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=imgs.shape[0])
        every = self.image_log_every_n_steps
        if every > 0 and self.global_step % every == 0 and self.global_step != self._last_image_step:
            self._last_image_step = self.global_step
            if self.trainer.is_global_zero:
                self.log_reconstructions(imgs, pred, mask)
        return loss

    def log_reconstructions(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> None:
        """Send an original / masked / reconstruction grid to every logger that takes images."""
        n = self.num_log_images
        grid = reconstruction_grid(self.model, imgs[:n], pred[:n], mask[:n], mean=self.pixel_mean, std=self.pixel_std)
        for logger in self.loggers:
            if hasattr(logger, "log_image"):  # WandbLogger
                logger.log_image(
                    key="train/reconstruction",
                    images=[grid.cpu()],
                    step=self.global_step,
                    caption=["rows: original / masked / reconstruction"],
                )
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard SummaryWriter
                logger.experiment.add_image("train/reconstruction", grid.cpu(), self.global_step)

    # ------------------------------------------------------------------ optimisation
    def per_device_batch_size(self) -> int:
        """The configured batch size, else the datamodule's, else the train DataLoader's."""
        if self.batch_size is not None:
            return self.batch_size
        datamodule = getattr(self.trainer, "datamodule", None)
        if isinstance(getattr(datamodule, "batch_size", None), int):
            return datamodule.batch_size  # type: ignore[union-attr]
        if self.trainer.train_dataloader is None:
            self.trainer.fit_loop.setup_data()  # Lightning loads the train dataloader only later otherwise
        loader = self.trainer.train_dataloader
        if isinstance(getattr(loader, "batch_size", None), int):
            return loader.batch_size  # type: ignore[union-attr]
        raise ValueError("MaeModule: cannot tell the per-device batch size for lr scaling; set module batch_size")

    def effective_batch_size(self) -> int:
        """World size x per-device batch x gradient accumulation."""
        return self.trainer.world_size * self.per_device_batch_size() * self.trainer.accumulate_grad_batches

    def param_groups(self) -> list[dict[str, Any]]:
        """Two groups: decayed weights, and (no decay) norms, biases, tokens and position embeddings."""
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if strip_wrapper_names(name) in self.no_decay_names else decay).append(p)
        return [
            {"params": decay, "weight_decay": self.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        eff = self.effective_batch_size()
        lr = self.lr if self.lr is not None else self.base_lr * eff / 256
        self.scaled_lr = lr
        optimizer = self.optimizer_factory(self.param_groups(), lr=lr)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "MaeModule: the cosine schedule needs a finite length; set trainer.max_steps or max_epochs"
            )
        total = int(total)
        warmup = self.warmup_steps if self.warmup_steps is not None else int(self.warmup_fraction * total)
        log.info("MAE: effective batch %d -> lr %.3g; %d warm-up of %d steps", eff, lr, warmup, total)
        scheduler = warmup_cosine_schedule(optimizer, warmup, total, min_lr_ratio=self.min_lr / lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
