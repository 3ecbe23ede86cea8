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
    # metrics.csv kept the history of all three runs: every step once (the recomputed ones replaced)
    assert {step: len(v) for step, v in losses(run_dir).items()} == dict.fromkeys(range(MAX_STEPS), 1)


# ---------------------------------------------------------------------------------------------------
# The README's main recipe, as a user runs it: whatever medical_demo is, only the budget is overridden.
DEMO = ["fit", "recipe=medical_demo", "trainer.deterministic=true", "~evaluate"]


def demo_plan(data_root: Path) -> tuple[int, list[str]]:
    """Optimiser steps per epoch of the recipe's training loader, and the overrides every run gets besides
    its step budget: the data root (prepared here, once, so the two parallel runs do not race to write
    it) and, where the recipe has a wall-clock budget, none (steps end a run, not the machine's speed)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sam_train.cli import CONFIG_DIR

    # every 3rd slice: the recipe unchanged, a third of the slices to encode and an epoch of ~14 steps
    overrides = [f"data_root={data_root}", "data.train.slice_step=3"]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("fit", overrides=[*DEMO[1:], *overrides])
    if OmegaConf.select(cfg, "trainer.max_time") is not None:
        overrides.append("trainer.max_time=null")
    # (a data module that caches embeddings in its setup has the cached length before it, too)
    epoch = len(instantiate(cfg.data).train_dataloader()) // int(cfg.trainer.accumulate_grad_batches)
    return epoch, overrides


def final_state(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {"step": ckpt["global_step"], "weights": ckpt["state_dict"], "optimizer": ckpt["optimizer_states"],
            "schedulers": ckpt["lr_schedulers"]}  # fmt: skip


@pytest.mark.slow  # 5 `sam-train fit` processes, two at a time: ~1 min with vit_t, minutes with LiteMedSAM
@pytest.mark.timeout(3600)  # the recipe decides the steps per epoch, and this test runs more than one epoch
def test_medical_demo_resume_after_sigkill_is_exact(tmp_path):
    """`sam-train fit recipe=medical_demo` SIGKILLed three times in a row, rerun with the same command each
    time, ends with exactly the weights, optimiser and scheduler state of an uninterrupted run. The kills:
    mid-epoch (resumed from a mid-epoch checkpoint), right after a checkpoint was written (nothing to
    redo), one step after an epoch boundary (resumed from the epoch-end checkpoint)."""
    from concurrent.futures import ThreadPoolExecutor

    epoch, overrides = demo_plan(tmp_path / "data")
    # last.ckpt every `every` steps: two mid-epoch checkpoints in the first epoch, none at the step after its end
    every = next((k for k in range(max(2, epoch // 3), 1, -1) if 2 * k < epoch and (epoch + 1) % k), None)
    assert every, f"an epoch of {epoch} steps is too short for the three kill points"
    max_steps = epoch + every + 1
    budget = [f"trainer.max_steps={max_steps}", f"callbacks.model_checkpoint.every_n_train_steps={every}",
              "callbacks.epoch_checkpoint.every_n_epochs=1", *overrides]  # fmt: skip
    # (step SIGKILLed in, step of the last.ckpt the next run resumes from)
    kills = [(every + 1, every), (2 * every, 2 * every), (epoch + 1, epoch)]
    note = f"(epoch = {epoch} steps, last.ckpt every {every}, {max_steps} steps, kills {kills})"

    def play(name: str) -> str | None:
        run_dir = tmp_path / name
        command = [*SAM_TRAIN, *DEMO, *budget, f"run_dir={run_dir}"]
        for kill, resume in kills if name == "killed" else []:
            result = run([*command, *fault("SIGKILL", kill)], timeout=1800)
            if result.returncode != -signal.SIGKILL:
                return f"expected SIGKILL in step {kill}, got exit {result.returncode}: {result.stderr[-2000:]}"
            if ckpt_step(run_dir / "checkpoints" / "last.ckpt") != resume:
                return f"killed in step {kill}, last.ckpt is not at step {resume} {note}"
        result = run(command, timeout=1800)
        return None if result.returncode == 0 else f"{name}: exit {result.returncode}: {result.stderr[-3000:]}"

    with ThreadPoolExecutor(max_workers=2) as pool:  # two cores: the reference beside the killed chain
        errors = [e for e in pool.map(play, ["reference", "killed"]) if e]
    assert not errors, "\n".join(errors)

    reference, resumed = final_state(tmp_path / "reference"), final_state(tmp_path / "killed")
    assert reference["step"] == resumed["step"] == max_steps, note
    ref_losses, got_losses = losses(tmp_path / "reference"), losses(tmp_path / "killed")
    # which resume went wrong, if any (a killed run's unflushed rows are lost: compare the steps both have)
    differ = [s for s in sorted(ref_losses) if s in got_losses and got_losses[s][-1] != ref_losses[s][0]]
    assert not differ, f"logged losses differ from step {differ[0]} on {note}"
    for key, want in reference["weights"].items():
        assert torch.equal(resumed["weights"][key], want), f"{key} differs from the uninterrupted run's {note}"
    assert resumed["schedulers"] == reference["schedulers"], note
    for got, want in zip(resumed["optimizer"], reference["optimizer"], strict=True):
        for p, state in want["state"].items():
            assert all(torch.equal(got["state"][p][k], v) for k, v in state.items()), ("optimizer", p, note)


@pytest.mark.slow  # three `sam-train pretrain` processes: ~45 s on 2 idle cores
def test_mae_tiny_demo_resume_after_sigkill_is_exact(tmp_path):
    """The MAE demo recipe too: SIGKILLed after its second checkpoint and rerun, it ends with the weights
    of an uninterrupted run (image order, random crops and the loader position restored)."""
    command = [*SAM_TRAIN, "pretrain", "recipe=mae_tiny_demo", "trainer.max_steps=9", "trainer.deterministic=true",
               "callbacks.model_checkpoint.every_n_train_steps=3", f"data_root={tmp_path / 'data'}"]  # fmt: skip
    result = run([*command, f"run_dir={tmp_path / 'reference'}"], timeout=600)  # also writes the images once
    assert result.returncode == 0, result.stderr[-3000:]
    killed = [*command, f"run_dir={tmp_path / 'killed'}"]
    assert run([*killed, *fault("SIGKILL", 7)], timeout=600).returncode == -signal.SIGKILL
    assert ckpt_step(tmp_path / "killed" / "checkpoints" / "last.ckpt") == 6
    result = run(killed, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reference, resumed = final_state(tmp_path / "reference"), final_state(tmp_path / "killed")
    assert reference["step"] == resumed["step"] == 9
    for key, want in reference["weights"].items():
        assert torch.equal(resumed["weights"][key], want), key
