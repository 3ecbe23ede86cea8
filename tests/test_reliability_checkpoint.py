"""Atomic checkpoint writes and weights-only reads (AtomicCheckpointIO)."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest
import torch

from sam_train.callbacks import AtomicCheckpointIO, load_weights_only
from sam_train.models.checkpoint import CheckpointError


class Custom:  # a class torch's weights-only unpickler does not know
    def __init__(self):
        self.x = 1


def test_kill_during_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(4.0)}, path)

    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")  # part of the new file reached the disk, then the process dies
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.setattr(torch, "save", real_save)

    loaded = io.load_checkpoint(path)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the partial temp file is gone


def test_write_replaces_atomically_and_fsyncs(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "a.ckpt"
    io.save_checkpoint({"step": 1}, path)
    io.save_checkpoint({"step": 2}, path)
    assert io.load_checkpoint(path)["step"] == 2
    assert len(synced) >= 4  # file and directory, for each of the two writes
    assert not list(path.parent.glob("*.tmp"))


def test_custom_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"cfg": Custom()}}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: refused to load.*Custom"):
        AtomicCheckpointIO().load_checkpoint(path)
    # weights_only=False is not honoured: the file is still refused
    with pytest.raises(CheckpointError, match="refused"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)


def test_plain_containers_load(tmp_path):
    path = tmp_path / "ok.ckpt"
    obj = {"a": [1, 2.5, "x"], "b": collections.OrderedDict(w=torch.ones(3)), "c": (None, True)}
    torch.save(obj, path)
    loaded = load_weights_only(path)
    assert loaded["a"] == [1, 2.5, "x"] and torch.equal(loaded["b"]["w"], torch.ones(3))


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: truncated or corrupt checkpoint"):
        load_weights_only(path)


def test_lightning_checkpoint_of_sam_module_loads_weights_only(tmp_path, tiny_sam):
    """Our own LightningModule's checkpoints (hyper-parameters included) pass weights_only=True."""
    from functools import partial

    import lightning.pytorch as pl

    from sam_train.lit.sam_module import SamModule
    from sam_train.losses.sam_loss import SamLossConfig
    from sam_train.optim import param_groups
    from sam_train.prompts.interactive import PromptSimulationConfig

    module = SamModule(
        model=tiny_sam,
        prompts=PromptSimulationConfig(num_iterations=2, num_mask_only=1),
        loss=SamLossConfig(),
        optimizer=partial(torch.optim.AdamW, lr=1e-4),
        param_groups=partial(param_groups, lr=1e-4, weight_decay=0.0),
        report_iterations=(1,),
        seed=3,
    )
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, plugins=[AtomicCheckpointIO()]
    )
    trainer.strategy.connect(module)
    path = Path(tmp_path / "m.ckpt")
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"] == {"seed": 3}
    assert any(k.startswith("model.image_encoder.") for k in ckpt["state_dict"])
