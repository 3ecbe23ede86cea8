"""SamDataModule over map-style and iterable datasets; the data-loading benchmark's --smoke run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from sam_train.data.datamodule import SamDataModule
from sam_train.data.sample import SampleDataset
from sam_train.data.toy_shapes import make_toy_shapes
from sam_train.data.transforms import SamTransform
from sam_train.data.webdataset import ShardDataset, write_shards

ROOT = Path(__file__).resolve().parents[1]


class ListDataset(SampleDataset):
    def __init__(self, samples, **kwargs):
        super().__init__(**kwargs)
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def source_of(self, index):
        return self.samples[index]["source"]

    def load(self, index):
        return self.samples[index]


def _check_batch(batch, b, s):
    assert batch["images"].shape == (b, 3, s, s) and batch["images"].dtype == torch.uint8
    m = batch["masks"].shape[0]
    assert batch["masks"].shape == (m, s, s) and batch["image_ids"].shape == (m,) and batch["class_ids"].shape == (m,)
    assert batch["image_ids"].unique().tolist() == list(range(b)) and len(batch["ids"]) == b


def test_map_style_and_iterable_datasets(tmp_path):
    samples = make_toy_shapes(10, 40, torch.Generator().manual_seed(0))
    write_shards(samples, tmp_path / "shards", max_samples_per_shard=4, progress=False)
    t = SamTransform(32, hflip_p=0.5)
    dm = SamDataModule(train=ListDataset(samples, transform=t), val=ShardDataset(tmp_path / "shards", transform=t),
                       batch_size=4, num_workers=0)
    train = list(dm.train_dataloader())
    assert len(train) == 2  # drop_last on training
    for batch in train:
        _check_batch(batch, 4, 32)
    val = list(dm.val_dataloader())
    assert [v["images"].shape[0] for v in val] == [4, 4, 2]
    assert sorted(i for v in val for i in v["ids"]) == sorted(s["id"] for s in samples)
    # two workers: shards split across them, every sample once
    dm2 = SamDataModule(train=ListDataset(samples), val=ShardDataset(tmp_path / "shards", transform=t),
                        batch_size=2, num_workers=2)
    ids = [i for v in dm2.val_dataloader() for i in v["ids"]]
    assert sorted(ids) == sorted(s["id"] for s in samples)


def test_benchmark_smoke():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_loading.py"), "--smoke"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "naive per-image COCO json loader" in out.stdout and "ratio shard / naive:" in out.stdout
    ratio = float(out.stdout.split("ratio shard / naive:")[1].split("x")[0])
    assert ratio > 0
