"""The `sam-train` command line: help, one-line errors, every recipe composes and runs 2 steps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sam_train.cli import COMMANDS, CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.stem for p in (ROOT / "sam_train" / "configs" / "recipe").glob("*.yaml"))
COMMAND_OF_PREFIX = {"mae_": "pretrain", "data_engine": "engine", "distill_": "distill"}  # other recipes: fit
FIT_RECIPES = [r for r in RECIPES if not r.startswith(tuple(COMMAND_OF_PREFIX))]


def sam_train(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("sam-train")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_help_lists_commands_and_groups():
    out = sam_train("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout
    for group in ("model", "data", "prompts", "loss", "optim", "trainer", "logger", "recipe"):
        assert f"  {group}" in out.stdout
    assert "medical_demo" in out.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["fit", "recipe=no_such_recipe"], ["recipe/no_such_recipe", "medical_demo", "samed_lora"]),
        (["fit", "model=vit_q"], ["model/vit_q", "vit_b", "vit_t"]),
        (["fit", "trainer.max_stepz=3"], ["trainer.max_stepz", "max_steps"]),
        (["fitt"], ["unknown command 'fitt'", "fit"]),
        (["fit", "data=medical", "data.train.root=/nonexistent/msd", "run_dir=/tmp/sam_train_bad"],
         ["/nonexistent/msd"]),
        (["fit", "data=medical", "run_dir=/tmp/sam_train_bad"], ["data.train.root"]),
    ],
)
def test_bad_input_gives_one_line_error(args, expected):
    out = sam_train(*args)
    assert out.returncode != 0
    err = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr
    error_lines = [line for line in err if line.startswith("sam-train: error:")]
    assert len(error_lines) == 1, out.stderr
    for word in expected:
        assert word in error_lines[0], (word, error_lines[0])


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes(recipe):
    config = next((c for prefix, c in COMMAND_OF_PREFIX.items() if recipe.startswith(prefix)), "fit")
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config, overrides=[f"recipe={recipe}"])
    assert cfg.name


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory) -> Path:
    from sam_train.data.mni import prepare_mni_demo

    return prepare_mni_demo(tmp_path_factory.mktemp("msd") / "mni", n_cases=4, zoom=0.25)


@pytest.mark.parametrize("recipe", FIT_RECIPES)
def test_recipe_two_step_smoke(recipe, msd_root, tmp_path):
    """Each fit recipe trains 2 steps on tiny data (vit_t on CPU; medical recipes on real MR slices)."""
    from sam_train.commands.fit import fit

    overrides = [
        f"recipe={recipe}",
        "model=vit_t",
        "trainer=cpu",
        "trainer.num_nodes=1",  # sam_paper asks for 8 nodes
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "optim.scheduler.warmup_steps=1",
        "prompts.num_iterations=2",
        "prompts.num_mask_only=0",
        "data.batch_size=2",
        "data.num_workers=0",
        "++data.pin_memory=false",
        f"run_dir={tmp_path}/run",
        "~evaluate",
        "logger=csv",
    ]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        base = compose("fit", overrides=[f"recipe={recipe}"])
    data_target = base.data.train._target_
    if data_target.endswith("MedicalSliceDataset"):
        overrides.append(f"data.train.root={msd_root}")
    elif data_target.endswith("ShardDataset"):
        overrides += ["data=toy_shapes", "data.train.n=8", "data.val.n=2"]
    elif data_target.endswith("mni_demo_slices"):
        overrides.append(f"data_root={tmp_path}/data")
    else:
        overrides += ["data.train.n=8", "data.val.n=2"]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("fit", overrides=overrides)
    metrics = fit(cfg)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert metrics["train/loss"] == metrics["train/loss"]  # finite, logged
    assert 0.0 <= metrics["val/iou"] <= 1.0


def test_sweep_jobs_get_their_own_run_dirs(tmp_path):
    """`sam-train fit -m` with two jobs: each trains into <sweep dir>/<job number> (the default run_dir's
    timestamp is shared by the sweep, so without this the second job would resume the first one)."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "sam_train.cli", "fit", "-m", "seed=3,4", f"hydra.sweep.dir={sweep}",
         "trainer=cpu", "trainer.max_steps=2", "optim.scheduler.warmup_steps=1", "trainer.limit_val_batches=0",
         "trainer.enable_progress_bar=false",
         "prompts.num_iterations=1", "prompts.num_mask_only=0", "data.train.n=4", "data.val.n=2",
         "data.batch_size=2", "logger=csv", f"data_root={tmp_path}/data"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, seed in ((0, 3), (1, 4)):
        run_dir = sweep / str(job)
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        assert OmegaConf.load(run_dir / "config.yaml").seed == seed
        assert OmegaConf.load(run_dir / "config.yaml").run_dir == str(run_dir)
