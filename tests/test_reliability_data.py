"""Data side of reliability: the training loader resumes mid-epoch with the very same batches (order and
augmentations), and bad samples are counted per file, logged, and fail the run past a set fraction."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch

from sam_train.callbacks import SkipMonitor
from sam_train.data.datamodule import SamDataModule
from sam_train.data.sample import DataError, SampleDataset
from sam_train.data.toy_shapes import ToyShapesDataset
from sam_train.data.transforms import SamTransform


def toy_module(seed=0):
    transform = SamTransform(64, hflip_p=0.5, vflip_p=0.5, scale_jitter=(0.8, 1.2))
    return SamDataModule(train=ToyShapesDataset(n=10, size=48, transform=transform), batch_size=2, seed=seed)


def same_batch(a, b):
    return a["ids"] == b["ids"] and torch.equal(a["images"], b["images"]) and torch.equal(a["masks"], b["masks"])


def test_loader_resumes_mid_epoch_with_identical_batches():
    loader = toy_module().train_dataloader()
    loader.sampler.set_epoch(0)
    epoch0 = list(loader)
    loader.sampler.set_epoch(1)
    epoch1 = list(loader)
    assert [b["ids"] for b in epoch0] != [b["ids"] for b in epoch1]  # reshuffled per epoch
    assert len(epoch1) == 5

    loader.sampler.set_epoch(1)
    it = iter(loader)
    consumed = [next(it) for _ in range(2)]
    state = loader.state_dict()

    fresh = toy_module().train_dataloader()  # a new process: new dataset, transform, loader
    fresh.load_state_dict(state)
    rest = list(fresh)
    assert all(same_batch(a, b) for a, b in zip(consumed, epoch1[:2], strict=True))
    assert len(rest) == 3 and all(same_batch(a, b) for a, b in zip(rest, epoch1[2:], strict=True))


def test_loader_state_after_the_last_batch_continues_with_next_epoch():
    loader = toy_module().train_dataloader()
    loader.sampler.set_epoch(0)
    list(loader)
    state = loader.state_dict()
    loader.sampler.set_epoch(1)
    epoch1 = list(loader)
    fresh = toy_module().train_dataloader()
    fresh.load_state_dict(state)
    assert all(same_batch(a, b) for a, b in zip(list(fresh), epoch1, strict=True))


class Flaky(SampleDataset):
    """Toy samples from two files; indices in `bad` fail to decode."""

    def __init__(self, bad, n=40, **kwargs):
        super().__init__(transform=SamTransform(64), **kwargs)
        self.toy = ToyShapesDataset(n=n, size=32)
        self.bad = set(bad)

    def __len__(self):
        return len(self.toy)

    def source_of(self, index):
        return f"shard-{index % 2}.tar"

    def load(self, index):
        if index in self.bad:
            raise OSError(f"truncated image in sample {index}")
        return self.toy.load(index)


class NoTrain(pl.LightningModule):
    """Training step that only touches the batch: the data path is what is under test."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return self.w * batch["images"].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(dataset, tmp_path):
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[SkipMonitor(every_n_steps=1)],
    )  # fmt: skip
    trainer.fit(NoTrain(), datamodule=SamDataModule(train=dataset, batch_size=4, num_workers=0))
    return trainer


def test_bad_samples_are_counted_per_file_and_logged(tmp_path, caplog):
    dataset = Flaky(bad=[3, 5, 8], on_error="skip", max_skip_fraction=0.2)
    with caplog.at_level(logging.WARNING):
        trainer = fit(dataset, tmp_path)
    assert dataset.skips.by_source == {"shard-1.tar": 2, "shard-0.tar": 1}
    assert float(trainer.callback_metrics["data/skipped"]) == 3
    assert 0 < float(trainer.callback_metrics["data/skip_fraction"]) <= 0.2
    assert any("shard-1.tar" in r.getMessage() and "per file" in r.getMessage() for r in caplog.records)


def test_too_many_bad_samples_is_a_clear_error(tmp_path):
    dataset = Flaky(bad=range(0, 40, 3), on_error="skip", max_skip_fraction=0.2)  # a third is broken
    with pytest.raises(DataError, match=r"too many bad samples: .*max_skip_fraction=0.2.*shard-"):
        fit(dataset, tmp_path)
