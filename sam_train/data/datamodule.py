"""SamDataModule: DataLoaders over already-built datasets (map-style or iterable), batches by collate_sam.

Training loaders are torchdata `StatefulDataLoader`s: Lightning stores their position in every
checkpoint and restores it, so a run resumed mid-epoch continues with the very next batch. For map-style
datasets the order is a pure function of (seed, epoch) (`ResumableSampler`) and each sample's
augmentation a pure function of (seed, epoch, index) (`EpochSeededDataset`), so the resumed batches are
identical to those of an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from sam_train.data.sample import collate_sam
from sam_train.seeding import derive_seed


class ResumableSampler(DistributedSampler):
    """Shuffled (or sequential) order drawn from (seed, epoch), split across ranks; yields keys
    `epoch * len(dataset) + index` so the dataset knows the epoch of each read.

    A DistributedSampler, so Lightning keeps it under DDP (and calls `set_epoch`) instead of replacing
    it; with no process group it is the whole dataset on one replica. Its state is (epoch, indices
    yielded in this epoch): StatefulDataLoader saves it, and a restored sampler continues the same
    epoch's order where it stopped (Lightning creates the resumed iterator before it calls set_epoch,
    so the epoch must come from the state).

    `batch_size` > 1 (the loader drops its last incomplete batch) truncates each rank's epoch to whole
    batches here, in the sampler: otherwise a checkpoint after an epoch's last batch would hold a
    sampler with a few indices left, which the resumed loader reads as "mid-epoch", drops as an
    incomplete batch, and so skips a whole epoch of the uninterrupted run's order.
    """

    def __init__(self, dataset: Any, *, shuffle: bool = True, seed: int = 0, batch_size: int = 1) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        replicas = {} if distributed else {"num_replicas": 1, "rank": 0}
        super().__init__(dataset, shuffle=shuffle, seed=seed, drop_last=False, **replicas)
        self.batch_size = max(int(batch_size), 1)
        self.yielded = 0
        self._resume_at = 0

    def __len__(self) -> int:
        return self.num_samples // self.batch_size * self.batch_size

    def __iter__(self) -> Iterator[int]:
        n, epoch = len(self.dataset), self.epoch
        start, self._resume_at = self._resume_at, 0
        self.yielded = start
        for i in list(super().__iter__())[start : len(self)]:
            self.yielded += 1
            yield epoch * n + int(i)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.epoch = int(state_dict["epoch"])
        self._resume_at = int(state_dict["yielded"])
        if self._resume_at >= len(self):
            # saved after the epoch's last batch: Lightning reuses this restored iterator for the next
            # epoch, so it must yield the next epoch's order (not nothing, which would skip an epoch)
            self.epoch, self._resume_at = self.epoch + 1, 0


class EpochSeededDataset(Dataset):
    """Reads key `epoch * n + index` as `dataset[index]`, first seeding whatever draws random numbers
    for the sample from (seed, epoch, index): the dataset's transform and / or the dataset itself, if
    they have `seed_next` (SamTransform, EmbeddingDataset's object subsampling). Plain keys 0..n-1
    (a sequential loader, validation) are epoch 0: every validation then sees the same samples."""

    def __init__(self, dataset: Any, *, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> Any:
        epoch, index = divmod(int(key), len(self.dataset))
        for target in (self.dataset, getattr(self.dataset, "transform", None)):
            if hasattr(target, "seed_next"):
                target.seed_next(derive_seed("sample", self.seed, epoch, index))
        return self.dataset[index]


class SamDataModule(L.LightningDataModule):
    """Wraps train / val (/ test) datasets into DataLoaders that yield the batch format of collate_sam.

    Args:
        train: training dataset (a SampleDataset, a ShardDataset, ... with a SamTransform applied).
        val, test: optional evaluation datasets.
        batch_size: images per batch (objects per batch vary: all masks of the images are concatenated).
        num_workers: DataLoader worker processes; iterable datasets split their shards across them.
        pin_memory: page-locked host batches for faster copies to the GPU (ignored without CUDA).
        persistent_workers: keep workers alive between epochs (only used when num_workers > 0).
        drop_last: drop the last incomplete training batch.
        seed: seed of the training order and of each training sample's augmentation (map-style datasets).
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
        sampler = None  # iterable datasets shuffle shards and a buffer themselves
        if not isinstance(dataset, IterableDataset):
            dataset = EpochSeededDataset(dataset, seed=self.seed)
            if train:
                sampler = ResumableSampler(
                    dataset, shuffle=True, seed=self.seed, batch_size=batch_size if self.drop_last else 1
                )
        loader_cls = StatefulDataLoader if train else DataLoader
        return loader_cls(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),  # nothing to pin for on a CPU (and it warns)
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
