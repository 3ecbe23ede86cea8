"""Shard writer / reader: shard sizes, node x worker splitting, shuffling, resampled epochs."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from sam_train.data.toy_shapes import make_toy_shapes
from sam_train.data.webdataset import ShardDataset, write_shards


@pytest.fixture
def shard_dir(tmp_path):
    samples = make_toy_shapes(24, 32, torch.Generator().manual_seed(0))
    write_shards(samples, tmp_path / "shards", max_samples_per_shard=3, progress=False)
    return tmp_path / "shards"


def test_writer_shard_sizes_and_index(tmp_path, shard_dir):
    index = json.loads((shard_dir / "index.json").read_text())
    assert index["num_samples"] == 24
    assert [s["num_samples"] for s in index["shards"]] == [3] * 8
    assert sorted(p.name for p in shard_dir.glob("*.tar")) == [s["file"] for s in index["shards"]]
    # byte limit: a new shard once the current one passes max_bytes
    samples = make_toy_shapes(6, 32, torch.Generator().manual_seed(1))
    shards = write_shards(samples, tmp_path / "by_bytes", max_bytes=1, progress=False)
    assert len(shards) == 6


def test_reader_yields_written_samples(shard_dir):
    written = {s["id"]: s for s in make_toy_shapes(24, 32, torch.Generator().manual_seed(0))}
    read = list(ShardDataset(shard_dir, shuffle_buffer=0))
    assert [s["id"] for s in read] == sorted(written)  # no shuffling: written order
    for s in read:
        assert torch.equal(s["image"], written[s["id"]]["image"])
        assert torch.equal(s["masks"], written[s["id"]]["masks"])
        assert torch.equal(s["class_ids"], written[s["id"]]["class_ids"])


def test_reader_shuffles_and_reshuffles_each_epoch(shard_dir):
    ds = ShardDataset(shard_dir, shuffle_buffer=10, seed=3)
    first, second = [s["id"] for s in ds], [s["id"] for s in ds]
    assert sorted(first) == sorted(second) and len(set(first)) == 24
    assert first != sorted(first) and first != second


def _epoch_ids(shard_dir, monkeypatch, rank: int, **kwargs) -> list[tuple[str, str]]:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = ShardDataset(shard_dir, shuffle_buffer=5, **kwargs)
    loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork")
    return [(s["source"].rsplit(":", 1)[0], s["id"]) for s in loader]


def test_two_nodes_two_workers_cover_every_shard_once(shard_dir, monkeypatch):
    per_rank = [_epoch_ids(shard_dir, monkeypatch, rank) for rank in (0, 1)]
    everything = per_rank[0] + per_rank[1]
    assert len(everything) == 24 and len(set(everything)) == 24  # every sample exactly once
    shards_of = [{shard for shard, _ in ids} for ids in per_rank]
    assert not shards_of[0] & shards_of[1]  # a shard belongs to one node
    assert len(shards_of[0] | shards_of[1]) == 8
    assert Counter(shard for shard, _ in everything) == Counter({s: 3 for s in shards_of[0] | shards_of[1]})


def test_resampled_epochs_same_length_per_rank_no_repeats(shard_dir, monkeypatch):
    per_rank = [_epoch_ids(shard_dir, monkeypatch, rank, resampled=True, epoch_size=20) for rank in (0, 1)]
    for ids in per_rank:
        assert len(ids) == 10  # epoch_size / (2 nodes) per rank: 5 per worker
        assert len(set(ids)) == 10  # never the same sample twice on one process
    with pytest.raises(ValueError, match="epoch_size 30 > 24"):
        ShardDataset(shard_dir, resampled=True, epoch_size=30)


def test_len_per_rank(shard_dir, monkeypatch):
    assert len(ShardDataset(shard_dir)) == 24
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert len(ShardDataset(shard_dir)) == 12
