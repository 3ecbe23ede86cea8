"""SamDataModule: DataLoaders over already-built datasets (map-style or iterable), batches by collate_sam."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from sam_train.data.sample import collate_sam


class SamDataModule(L.LightningDataModule):
    """Wraps train / val (/ test) datasets into DataLoaders that yield the batch format of collate_sam.

    Args:
        train: training dataset (a SampleDataset, a ShardDataset, ... with a SamTransform applied).
        val, test: optional evaluation datasets.
        batch_size: images per batch (objects per batch vary: all masks of the images are concatenated).
        num_workers: DataLoader worker processes; iterable datasets split their shards across them.
        pin_memory: page-locked host batches for faster copies to the GPU.
        persistent_workers: keep workers alive between epochs (only used when num_workers > 0).
        drop_last: drop the last incomplete training batch.
        seed: seed of the training sampler's shuffling (map-style datasets).
    """

    def __init__(
        self,
        *,
        train: Any,
        val: Any | None = None,
        test: Any | None = None,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        drop_last: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train, self.val, self.test = train, val, test
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.drop_last = drop_last
        self.seed = seed

    def _loader(self, dataset: Any, *, batch_size: int, train: bool) -> DataLoader:
        iterable = isinstance(dataset, IterableDataset)
        generator = torch.Generator().manual_seed(self.seed) if train and not iterable else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train and not iterable,  # iterable datasets shuffle shards and a buffer themselves
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=self.drop_last and train,
            collate_fn=collate_sam,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, batch_size=self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val is None else self._loader(self.val, batch_size=self.val_batch_size, train=False)

    def test_dataloader(self) -> DataLoader | list:
        return [] if self.test is None else self._loader(self.test, batch_size=self.val_batch_size, train=False)
