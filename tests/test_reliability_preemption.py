"""SIGUSR1 / SIGTERM in-process: checkpoint at the next step boundary, then Preempted (a SystemExit with
code 75) before another step runs; in a Slurm batch job SIGUSR1 also makes rank 0 run `scontrol requeue`
(subprocess.run mocked), SIGTERM does not."""

from __future__ import annotations

import os
import signal
import subprocess
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

from sam_train.callbacks import (
    EXIT_REQUEUE,
    AtomicCheckpointIO,
    FaultInjection,
    Preempted,
    PreemptionCheckpoint,
    preemption,
)
from sam_train.commands.build import build_plugins
from sam_train.data.datamodule import SamDataModule
from sam_train.data.toy_shapes import ToyShapesDataset
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


def test_sigusr1_saves_at_step_boundary_and_exits_with_requeue_code(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    calls = []
    monkeypatch.setattr(preemption.subprocess, "run", lambda *a, **k: calls.append(a))
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
    assert calls == []  # outside Slurm: no scontrol


# ---------------------------------------------------------------------------------------- Slurm requeue
def _trainer(tmp_path, signal_name: str, plugins: list) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=20, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, plugins=plugins,
        callbacks=[PreemptionCheckpoint(), FaultInjection(step=3, kind="signal", signal_name=signal_name)],
    )  # fmt: skip


class FakeRun:
    """Stands in for subprocess.run in the preemption module: records the commands, answers `returncode`."""

    def __init__(self, returncode: int = 0, stderr: str = "") -> None:
        self.calls: list[tuple[list[str], dict]] = []
        self.returncode, self.stderr = returncode, stderr

    def __call__(self, cmd, **kwargs):
        self.calls.append((list(cmd), kwargs))
        return subprocess.CompletedProcess(cmd, self.returncode, stdout="", stderr=self.stderr)


@pytest.fixture
def slurm_job(monkeypatch):
    """The environment srun gives the one task of batch job 4242 (Lightning's SLURMEnvironment reads it)."""
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    env = dict(SLURM_JOB_ID="4242", SLURM_JOB_NAME="sam-fit", SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1",
               SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NNODES="1",
               SLURM_JOB_NUM_NODES="1", SLURM_NODELIST="localhost")  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    fake = FakeRun()
    monkeypatch.setattr(preemption.subprocess, "run", fake)
    return fake


def test_slurm_sigusr1_saves_then_rank0_requeues_once_then_exits_75(tmp_path, slurm_job):
    plugins = build_plugins()
    slurm = [p for p in plugins if isinstance(p, SLURMEnvironment)]
    assert len(slurm) == 1 and slurm[0].auto_requeue is False  # Lightning never saves inside the handler
    module = Tiny()
    data = SamDataModule(train=ToyShapesDataset(n=16, size=32, transform=SamTransform(32)), batch_size=2)
    trainer = _trainer(tmp_path, "SIGUSR1", plugins)
    with pytest.raises(Preempted, match=r"checkpoint saved at step 4 .*; Slurm job 4242 requeued") as info:
        trainer.fit(module, datamodule=data)
    assert info.value.code == EXIT_REQUEUE
    assert [cmd for cmd, _ in slurm_job.calls] == [["scontrol", "requeue", "4242"]]
    assert slurm_job.calls[0][1]["timeout"] > 0  # a hung controller cannot block the exit forever
    assert module.steps_run == 4
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert not list(tmp_path.rglob("hpc_ckpt*"))  # Lightning's in-handler hpc checkpoint never ran


def test_slurm_sigterm_saves_and_exits_without_requeue(tmp_path, slurm_job):
    # SIGTERM is scancel / the time limit / Slurm's own preemption: requeueing is not ours to decide.
    data = SamDataModule(train=ToyShapesDataset(n=16, size=32, transform=SamTransform(32)), batch_size=2)
    trainer = _trainer(tmp_path, "SIGTERM", build_plugins())
    with pytest.raises(Preempted, match=r"preempted \(SIGTERM on rank 0\): checkpoint saved at step 4") as info:
        trainer.fit(Tiny(), datamodule=data)
    assert info.value.code == EXIT_REQUEUE and slurm_job.calls == []


def test_failed_requeue_is_logged_and_still_exits_75(tmp_path, slurm_job, caplog):
    slurm_job.returncode, slurm_job.stderr = 1, "scontrol: error: Requested operation is presently disabled"
    data = SamDataModule(train=ToyShapesDataset(n=16, size=32, transform=SamTransform(32)), batch_size=2)
    trainer = _trainer(tmp_path, "SIGUSR1", build_plugins())
    with pytest.raises(Preempted, match=r"scontrol requeue 4242` failed") as info:
        trainer.fit(Tiny(), datamodule=data)
    assert info.value.code == EXIT_REQUEUE and len(slurm_job.calls) == 1
    assert "Requested operation is presently disabled" in caplog.text
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_only_rank0_runs_scontrol_and_other_ranks_follow_its_result(slurm_job):
    callback = PreemptionCheckpoint()
    broadcasts = []

    def broadcast(value, src=0):  # what rank 0 sent: scontrol succeeded there
        broadcasts.append((value, src))
        return True

    rank1 = SimpleNamespace(is_global_zero=False, strategy=SimpleNamespace(broadcast=broadcast))
    assert callback._requeue(rank1) == "; Slurm job 4242 requeued"
    assert slurm_job.calls == [] and broadcasts == [(False, 0)]


def test_job_id_of_array_task_and_outside_slurm(slurm_job, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert preemption.slurm_job_id() == "77_3"
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # salloc shell: not a batch job, never requeued
    assert preemption.slurm_job_id() is None
    monkeypatch.delenv("SLURM_NTASKS")
    assert preemption.slurm_job_id() is None
    assert not any(isinstance(p, SLURMEnvironment) for p in build_plugins())


def test_requeue_command_errors_never_raise(monkeypatch, caplog):
    def timeout(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(preemption.subprocess, "run", timeout)
    assert preemption.requeue_slurm_job("12", timeout_s=0.5) is False
    assert "scontrol requeue 12` failed" in caplog.text and "timed out" in caplog.text
    assert preemption.requeue_slurm_job("12; rm -rf /") is False  # never passes a non-id to scontrol


class TinyWithVal(Tiny):
    def __init__(self):
        super().__init__()
        self.val_batches = 0

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1


class SignalInValidation(pl.Callback):
    """SIGTERM in the middle of the first validation's second batch (a long validation inside fit)."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and batch_idx == 1 and trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_validation_saves_then_stops_the_validation(tmp_path):
    data = SamDataModule(
        train=ToyShapesDataset(n=16, size=32, transform=SamTransform(32)),
        val=ToyShapesDataset(n=12, size=32, transform=SamTransform(32)), batch_size=2,
    )  # fmt: skip
    module = TinyWithVal()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=20, val_check_interval=3, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()],
        callbacks=[PreemptionCheckpoint(), SignalInValidation()],
    )  # fmt: skip
    with pytest.raises(Preempted, match=r"preempted \(SIGTERM on rank 0\): checkpoint saved at step 3") as info:
        trainer.fit(module, datamodule=data)
    assert info.value.code == EXIT_REQUEUE
    assert module.val_batches == 2 and module.steps_run == 3  # 6 validation batches: stopped after the 2nd
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
