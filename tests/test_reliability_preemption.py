"""SIGUSR1 (Slurm's warning before the time limit) in-process: checkpoint at the next step boundary, then
Preempted (a SystemExit with code 75) before another step runs."""

from __future__ import annotations

import signal

import lightning.pytorch as pl
import pytest
import torch

from sam_train.callbacks import EXIT_REQUEUE, AtomicCheckpointIO, FaultInjection, Preempted, PreemptionCheckpoint
from sam_train.data.datamodule import SamDataModule
from sam_train.data.synthetic import ToyShapesDataset
from sam_train.data.transforms import SamTransform


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.steps_run = 0

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        return (self.w * batch["images"].float().mean() / 255) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_sigusr1_saves_at_step_boundary_and_exits_with_requeue_code(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    data = SamDataModule(train=ToyShapesDataset(n=16, size=32, transform=SamTransform(32)), batch_size=2)
    module = Tiny()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()],
        callbacks=[PreemptionCheckpoint(), FaultInjection(step=3, kind="signal", signal_name="SIGUSR1")],
    )  # fmt: skip
    with pytest.raises(Preempted, match=r"preempted \(SIGUSR1 on rank 0\): checkpoint saved at step 4") as info:
        trainer.fit(module, datamodule=data)
    assert info.value.code == EXIT_REQUEUE == 75
    assert module.steps_run == 4  # the interrupted step finished, no further step started
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and torch.equal(ckpt["state_dict"]["w"], module.w.detach())
    assert signal.getsignal(signal.SIGUSR1) == before  # handlers restored after fit
