"""Exact resume: SIGKILL `sam-train fit` at a random step, rerun the same command, and the per-step losses
after the resume equal those of an uninterrupted run. SIGTERM: checkpoint, exit code 75, resume."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
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


def fault(kind_signal: str, step: int) -> list[str]:
    """Overrides making the run send itself `kind_signal` in the middle of optimiser step `step` (after
    backward, before the update): a kill at an exact, randomly chosen point of training."""
    return [
        "+callbacks.fault._target_=sam_train.callbacks.FaultInjection", "+callbacks.fault.kind=signal",
        f"+callbacks.fault.step={step}", f"+callbacks.fault.signal_name={kind_signal}",
    ]  # fmt: skip


def check_matches_reference(
    run_dir: Path, reference: dict[int, float], from_step: int, note: str, to_step: int = MAX_STEPS
) -> None:
    after = losses(run_dir)
    for step in range(from_step, to_step):  # every step after the resume point was computed again ...
        assert step in after, f"{note}: step {step} missing after resume from {from_step}"
    for step, values in after.items():  # ... and every logged loss equals the uninterrupted run's
        assert values == pytest.approx([reference[step]] * len(values), rel=0, abs=1e-6), (note, step)


@pytest.mark.slow  # four `sam-train fit` processes: ~45 s on 2 idle cores
def test_sigkill_at_random_step_then_sigterm_then_resume_match_uninterrupted_run(tmp_path, reference):
    """One run directory, three runs of the same command: SIGKILL in the middle of a random step; the
    rerun resumes and gets SIGTERM (checkpoint at the step boundary, exit 75); the third run resumes and
    finishes. Every loss logged by any of them equals the uninterrupted run's loss of that step."""
    run_dir, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.ckpt"
    kill_step = random.randint(EVERY + 1, MAX_STEPS - 3)  # after the first checkpoint, leaving room for SIGTERM
    note = f"SIGKILL in step {kill_step}"

    result = run(fit_command(run_dir, *fault("SIGKILL", kill_step)))
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    resume_step = ckpt_step(last)
    assert EVERY <= resume_step <= kill_step, (note, resume_step)  # the last periodic / epoch checkpoint
    assert kill_step - 1 in losses(run_dir)  # it did train up to the kill

    # the same command again: resumes from last.ckpt; SIGTERM arrives in the middle of its second step
    result = run(fit_command(run_dir, *fault("SIGTERM", resume_step + 1)))
    output = result.stdout + result.stderr
    assert f"Restoring states from the checkpoint path at {last}" in output
    assert result.returncode == EXIT_REQUEUE == 75, output[-4000:]
    assert "preempted (SIGTERM" in output
    saved = ckpt_step(last)
    assert saved == resume_step + 2, (note, resume_step, saved)  # at the end of the step the signal hit
    check_matches_reference(run_dir, reference, resume_step, note, to_step=saved)

    result = run(fit_command(run_dir))  # and again: resumes from the SIGTERM checkpoint, runs to the end
    assert result.returncode == 0, result.stderr[-4000:]
    check_matches_reference(run_dir, reference, saved, note)
    assert ckpt_step(last) == MAX_STEPS
