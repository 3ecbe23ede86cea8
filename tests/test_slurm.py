"""Slurm launchers: the scripts parse, the Hydra submitit launcher config composes into the sbatch
options we rely on, and (slow) a real local Slurm requeues and resumes a 2-task DDP run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
SLURM = REPO / "slurm"
SCRIPTS = sorted([*SLURM.glob("*.sh"), *SLURM.glob("*.sbatch")])
SBATCH = sorted(SLURM.glob("*.sbatch"))
LAUNCHER = REPO / "sam_train" / "configs" / "hydra" / "launcher" / "slurm.yaml"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_expected_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert {"launch.sh", "local_cluster.sh", "test_local_slurm.sh"} <= names
    assert {p.name for p in SBATCH} == {
        "fit_single_node.sbatch", "fit_multi_node.sbatch", "pretrain_mae.sbatch", "distill.sbatch"
    }


def _directives(script: Path) -> dict[str, str]:
    """#SBATCH options of a script, as sbatch reads them: only the header before the first command."""
    options = {}
    for line in script.read_text().splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        match = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if match:
            options[match.group(1)] = match.group(2) or ""
    return options


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_sbatch_requeues_and_forwards_overrides(script):
    options = _directives(script)
    # Lightning's SLURM environment needs one task per GPU given per node (it rejects bare --ntasks).
    assert options["ntasks-per-node"] == options["gpus-per-node"]
    assert "ntasks" not in options
    assert re.fullmatch(r"SIGUSR1@\d+", options["signal"])  # to the srun tasks, not B: (the batch shell)
    assert "requeue" in options and options["open-mode"] == "append"
    body = script.read_text()
    assert "launch.sh" in body and re.search(r'sam_train_srun \w+ .*"\$@"\s*$', body)


def test_launcher_yaml_loads():
    raw = OmegaConf.load(LAUNCHER)
    assert raw._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert "submitit_slurm" in raw.defaults


def test_launcher_composes_with_fit():
    """`sam-train fit -m hydra/launcher=slurm ...`: the launcher node Hydra instantiates, resolved."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import get_class

    with initialize_config_dir(str(REPO / "sam_train" / "configs"), version_base="1.3"):
        cfg = compose(
            "fit",
            overrides=["hydra/launcher=slurm", "trainer.num_nodes=3", "hydra.launcher.gpus_per_node=8"],
            return_hydra_config=True,
        )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert get_class(launcher["_target_"]).__name__ == "SlurmLauncher"
    assert (launcher["nodes"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == (3, 8, 8)
    assert launcher["partition"] is None and launcher["timeout_min"] > 0
    assert launcher["additional_parameters"] == {"signal": f"USR1@{launcher['signal_delay_s']}", "requeue": True}


@pytest.mark.parametrize("command", ["fit", "pretrain"])
def test_sbatch_commands_compose_with_the_preemption_callback(command):
    """What the sbatch scripts run has PreemptionCheckpoint (SIGUSR1 -> last.ckpt -> scontrol requeue):
    fit through configs/callbacks/default.yaml, pretrain through configs/pretrain.yaml itself (the script
    adds no callback overrides)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from sam_train.callbacks import PreemptionCheckpoint

    overrides = ["run_dir=/tmp/unused"]
    if command == "pretrain":
        body = (SLURM / "pretrain_mae.sbatch").read_text()
        assert re.search(r"^sam_train_srun pretrain recipe=mae_vit_b trainer\.accelerator=gpu \"\$@\"$", body, re.M)
        assert "callbacks." not in body and "mae_data.root=" in body and " data.root=" not in body
        overrides += ["recipe=mae_vit_b"]
    with initialize_config_dir(str(REPO / "sam_train" / "configs"), version_base="1.3"):
        cfg = compose(command, overrides=overrides)
    # several callbacks write last.ckpt: it is overwritten, never last-v1.ckpt (which nothing resumes from)
    assert cfg.callbacks.model_checkpoint.save_last and not cfg.callbacks.model_checkpoint.enable_version_counter
    callback = instantiate(cfg.callbacks.preemption)
    assert isinstance(callback, PreemptionCheckpoint)
    assert callback.requeue_signals == (signal.SIGUSR1,) and callback.exit_code == 75
    assert signal.SIGTERM in callback.signals and signal.SIGUSR1 in callback.signals


@pytest.mark.slow  # fit ~55 s, pretrain ~25 s on 2 cores (mostly process start-up and DDP set-up)
@pytest.mark.timeout(600)
@pytest.mark.parametrize("script", ["fit_single_node.sbatch", "pretrain_mae.sbatch"])
def test_requeue_and_resume_on_local_slurm(script):
    """Installs (if missing) and starts a one-node Slurm, runs slurm/test_local_slurm.sh: a 2-task DDP
    `sam-train fit` (vit_t) / `sam-train pretrain` (tiny MAE) job gets SIGUSR1 once training is under way
    (no checkpoint yet), saves last.ckpt at the step boundary, requeues itself, resumes from it and
    completes. Needs root."""
    result = subprocess.run(
        ["bash", str(SLURM / "test_local_slurm.sh")], capture_output=True, text=True, timeout=580, cwd=REPO,
        env={**os.environ, "SLURM_TEST_SCRIPT": f"slurm/{script}"},
    )  # fmt: skip
    assert result.returncode == 0 and "SUMMARY: PASS" in result.stdout, result.stdout[-6000:] + result.stderr[-3000:]
