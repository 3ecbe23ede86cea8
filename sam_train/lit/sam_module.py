"""Thin LightningModule: SAM + interactive prompt simulation + SAM loss + optimiser wiring."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import MeanMetric

from sam_train.losses.distributed import global_num_objects
from sam_train.losses.sam_loss import SamLossConfig, sam_loss
from sam_train.models.sam import Sam
from sam_train.prompts.interactive import PromptSimulationConfig, simulate
from sam_train.seeding import derive_seed, seed_global_rngs

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
ParamGroupsFactory = Callable[[nn.Module], list[dict[str, Any]]]


def images_in_batch(batch: dict[str, Any]) -> int:
    """Images in a collated batch (for throughput logging)."""
    return len(batch["ids"])


def optimizer_config(
    model: nn.Module,
    optimizer: OptimizerFactory,
    param_groups: ParamGroupsFactory,
    scheduler: SchedulerFactory | None,
) -> dict[str, Any]:
    """Lightning's `configure_optimizers` answer: the optimiser over `param_groups(model)` and, if given, the
    scheduler stepped every optimiser step (shared by the Lightning modules that train a SAM)."""
    opt = optimizer(param_groups(model))
    if scheduler is None:
        return {"optimizer": opt}
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler(opt), "interval": "step"}}


class SamModule(pl.LightningModule):
    """Trains SAM on batches in the `collate_sam` format (see docs/architecture.md).

    Args:
        model: the SAM model (fine-tuning strategy already applied).
        prompts: interactive prompt simulation settings for training.
        loss: SAM loss weights and resolution.
        optimizer: partial optimiser taking param groups (e.g. AdamW with lr / weight decay).
        param_groups: builds param groups (no-decay, layer decay) from the model.
        scheduler: partial LR scheduler taking the optimiser, stepped every optimiser step.
        val_prompts: prompt simulation for validation (defaults to `prompts`); seeded per batch.
        report_iterations: iterations whose IoU / Dice are logged (1-based: IoU after 1 prompt, ...).
        seed: base seed of the prompt simulation.
        checkpoint_prompt_loop: recompute each training iteration's decoder + loss activations in
            backward instead of keeping them (`simulate(checkpoint_iterations=True)`): the memory of
            the prompt loop no longer grows with iterations x objects (SAM: 11 x 64 per image).
    """

    def __init__(
        self,
        *,
        model: Sam,
        prompts: PromptSimulationConfig,
        loss: SamLossConfig,
        optimizer: OptimizerFactory,
        param_groups: ParamGroupsFactory,
        scheduler: SchedulerFactory | None = None,
        val_prompts: PromptSimulationConfig | None = None,
        report_iterations: tuple[int, ...] = (1, 3, 5, 11),
        seed: int = 0,
        checkpoint_prompt_loop: bool = False,
    ) -> None:
        super().__init__()
        # Only plain values: config objects, Hydra ListConfigs and optimiser partials would make checkpoints
        # unloadable with torch.load(weights_only=True). The resolved config is in <run_dir>/config.yaml.
        self.save_hyperparameters("seed", logger=False)
        self.model = model
        self.prompts = prompts
        self.val_prompts = val_prompts or prompts
        self.loss_cfg = loss
        self.optimizer_factory = optimizer
        self.param_groups_factory = param_groups
        self.scheduler_factory = scheduler
        self.report_iterations = tuple(i for i in report_iterations if i <= self.val_prompts.num_iterations)
        self.seed = seed
        self.checkpoint_prompt_loop = checkpoint_prompt_loop
        self.val_iou = nn.ModuleList(MeanMetric() for _ in self.report_iterations)
        self.val_dice = nn.ModuleList(MeanMetric() for _ in self.report_iterations)

    # ------------------------------------------------------------------ helpers
    def generator(self, *parts: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(derive_seed(self.seed, self.global_rank, *parts))
        return gen

    def run_prompts(self, batch: dict[str, Any], cfg: PromptSimulationConfig, gen: torch.Generator):
        embeddings = self.model.batch_embeddings(batch)
        num_objects = global_num_objects(batch["masks"].shape[0], self.device)

        def loss_fn(low_res, iou_pred, gt, multimask):
            return sam_loss(low_res, iou_pred, gt, multimask, num_objects=num_objects, cfg=self.loss_cfg)

        return simulate(
            self.model.decode,
            embeddings,
            batch["masks"],
            batch["image_ids"],
            cfg,
            gen,
            loss_fn=loss_fn,
            image_sizes=batch["input_sizes"],
            checkpoint_iterations=self.checkpoint_prompt_loop and self.training,
        )

    # ------------------------------------------------------------------ steps
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed_global_rngs(derive_seed(self.seed, self.global_rank, 2, self.global_step, batch_idx))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        result = self.run_prompts(batch, self.prompts, self.generator(0, self.global_step))
        bs = batch["image_ids"].numel()
        self.log("train/loss", result.loss, prog_bar=True, batch_size=bs)
        for name in ("focal", "dice", "iou"):
            self.log(f"train/{name}", sum(step[name] for step in result.losses), batch_size=bs)
        self.log("train/iou_last", result.ious[-1].mean(), batch_size=bs)
        self.log("train/objects", float(batch["masks"].shape[0]), batch_size=bs)
        return result.loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        result = self.run_prompts(batch, self.val_prompts, self.generator(1, batch_idx))
        bs = batch["image_ids"].numel()
        self.log("val/loss", result.loss, batch_size=bs, sync_dist=True)
        for k, it in enumerate(self.report_iterations):
            self.val_iou[k].update(result.ious[it - 1])
            iou = result.ious[it - 1]
            self.val_dice[k].update(2 * iou / (1 + iou))  # per-object Dice from IoU of the same masks
            self.log(f"val/iou@{it}", self.val_iou[k], batch_size=bs)
            self.log(f"val/dice@{it}", self.val_dice[k], batch_size=bs)
        self.log("val/iou", self.val_iou[-1], prog_bar=True, batch_size=bs)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        return optimizer_config(self.model, self.optimizer_factory, self.param_groups_factory, self.scheduler_factory)
