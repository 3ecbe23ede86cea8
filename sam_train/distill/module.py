"""Thin LightningModule of stage 1: the student's image encoder learns to reproduce the teacher's embeddings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

from sam_train.distill.losses import embedding_mse
from sam_train.distill.models import check_compatible, freeze, teacher_embeddings
from sam_train.lit.sam_module import (
    OptimizerFactory,
    ParamGroupsFactory,
    SchedulerFactory,
    optimizer_config,
)
from sam_train.models.sam import Sam
from sam_train.seeding import derive_seed, seed_global_rngs

EmbeddingLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DistillModule(pl.LightningModule):
    """Embedding distillation (MobileSAM's decoupled distillation) on `collate_distill` batches.

    Args:
        model: the student, a whole `Sam` (its prompt encoder and mask decoder are the teacher's, frozen:
            only parameters with requires_grad are optimised, normally the image encoder alone).
        teacher: the teacher `Sam`, frozen; needed when batches carry no cached `teacher_embeddings`. It is
            held outside the module tree: it is in no checkpoint and DDP neither wraps nor syncs it.
        optimizer, param_groups, scheduler: as for SamModule (partials; the scheduler steps per optimiser step).
        loss: (student [B, C, h, w], teacher [B, C, h, w]) -> scalar; default `embedding_mse`.
        seed: base seed of the per-step reseeding of the global generators (drop path), exact on resume.
    """

    def __init__(
        self,
        *,
        model: Sam,
        teacher: Sam | None,
        optimizer: OptimizerFactory,
        param_groups: ParamGroupsFactory,
        scheduler: SchedulerFactory | None = None,
        loss: EmbeddingLoss = embedding_mse,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters("seed", logger=False)  # plain values only: weights_only checkpoints
        if teacher is not None:
            check_compatible(teacher, model)
            freeze(teacher)
        object.__setattr__(self, "teacher", teacher)  # not a submodule (see Args)
        self.teacher: Sam | None
        self.model = model
        self.optimizer_factory = optimizer
        self.param_groups_factory = param_groups
        self.scheduler_factory = scheduler
        self.loss_fn = loss
        self.seed = seed

    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    def targets(self, batch: dict[str, Any]) -> torch.Tensor:
        """[B, C, h, w] teacher embeddings: the cached ones of the batch, else the teacher's forward pass."""
        if "teacher_embeddings" in batch:
            return batch["teacher_embeddings"]
        if self.teacher is None:
            raise ValueError("DistillModule: the batch has no cached teacher_embeddings and no teacher was given")
        return teacher_embeddings(self.teacher, batch["images"])

    def embedding_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        student = self.model.encode(self.model.preprocess(batch["images"]))
        return self.loss_fn(student, self.targets(batch))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        seed_global_rngs(derive_seed(self.seed, self.global_rank, 2, self.global_step, batch_idx))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.embedding_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["ids"]))
        self.log("train/embedding_mse", loss, batch_size=len(batch["ids"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("val/embedding_mse", self.embedding_loss(batch), batch_size=len(batch["ids"]), sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        return optimizer_config(self.model, self.optimizer_factory, self.param_groups_factory, self.scheduler_factory)
