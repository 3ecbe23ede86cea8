"""Exact resume: SIGKILL `sam-train fit` at a random step, rerun the same command, and the per-step losses
after the resume equal those of an uninterrupted run. SIGTERM: checkpoint, exit code 75, resume."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sam_train.callbacks import EXIT_REQUEUE

SAM_TRAIN = [sys.executable, "-m", "sam_train.cli"]
MAX_STEPS = 8
EVERY = 2


def fit_command(run_dir: Path, *extra: str) -> list[str]:
    """A tiny deterministic toy run: vit_t, batch 2, 2 prompt iterations, last.ckpt every EVERY steps."""
    return [
        *SAM_TRAIN, "fit", "trainer=cpu", f"run_dir={run_dir}", f"trainer.max_steps={MAX_STEPS}",
        "trainer.deterministic=true", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=1000", "data.val=null", "data.train.n=6", "data.batch_size=2",
        "data.train.transform.hflip_p=0.5", "prompts.num_iterations=2", "prompts.num_mask_only=1",
        "optim.scheduler.warmup_steps=2", "+logger.csv.flush_logs_every_n_steps=1",
        f"callbacks.model_checkpoint.every_n_train_steps={EVERY}", *extra,
    ]  # fmt: skip


def env() -> dict[str, str]:
    # identical thread counts in every process: CPU reductions are then bit-identical run to run
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}


def losses(run_dir: Path) -> dict[int, list[float]]:
    """train/loss per step from the CSV logger (every row written, by all runs in this directory)."""
    out: dict[int, list[float]] = {}
    for path in run_dir.glob("logs/**/metrics.csv"):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    out.setdefault(int(row["step"]), []).append(float(row["train/loss"]))
    return out


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("reference")
    result = run(fit_command(run_dir))
    assert result.returncode == 0, result.stderr[-4000:]
    ref = losses(run_dir)
    assert sorted(ref) == list(range(MAX_STEPS)), ref
    return {step: values[0] for step, values in ref.items()}


def start_and_signal(run_dir: Path, sig: int, after_step: int) -> subprocess.Popen:
    """Start a run and send `sig` as soon as the loss of step `after_step` is logged (the signal then
    lands during step after_step + 1: the CSV row is written at the end of a step)."""
    proc = subprocess.Popen(fit_command(run_dir), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while after_step not in losses(run_dir):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, f"step {after_step} not reached within 120 s"
        time.sleep(0.02)
    proc.send_signal(sig)
    return proc


def test_sigkill_at_random_step_then_rerun_resumes_exactly(tmp_path, reference):
    kill_step = random.randint(EVERY, MAX_STEPS - 3)  # after the first checkpoint, before the end
    run_dir = tmp_path / "run"
    proc = start_and_signal(run_dir, signal.SIGKILL, kill_step)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGKILL, output[-3000:]
    resume_step = ckpt_step(run_dir / "checkpoints" / "last.ckpt")
    assert EVERY <= resume_step <= kill_step + 1 < MAX_STEPS, (kill_step, resume_step)

    result = run(fit_command(run_dir))  # the same command again
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Restoring states from the checkpoint path at {run_dir / 'checkpoints' / 'last.ckpt'}" in (
        result.stdout + result.stderr
    )
    after = losses(run_dir)
    # every step after the resume point was computed again, identically to the uninterrupted run
    for step in range(resume_step, MAX_STEPS):
        assert step in after, f"(killed after step {kill_step}) step {step} missing after resume from {resume_step}"
    for step, values in after.items():
        for value in values:
            assert value == pytest.approx(reference[step], rel=0, abs=1e-6), (kill_step, resume_step, step)
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == MAX_STEPS


def test_sigterm_saves_checkpoint_exits_75_and_resumes(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = start_and_signal(run_dir, signal.SIGTERM, 1)  # arrives during step index 2
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == EXIT_REQUEUE == 75, output[-4000:]
    assert "preempted (SIGTERM" in output
    saved = ckpt_step(run_dir / "checkpoints" / "last.ckpt")
    assert saved == 3  # at the end of the interrupted step (periodic checkpoints are at even steps)
    result = run(fit_command(run_dir))
    assert result.returncode == 0, result.stderr[-4000:]
    after = losses(run_dir)
    assert all(step in after for step in range(saved, MAX_STEPS))
    for step, values in after.items():
        assert values == pytest.approx([reference[step]] * len(values), rel=0, abs=1e-6)
