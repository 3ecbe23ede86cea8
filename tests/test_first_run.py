"""What a new user hits first, run the way a user runs it (`sam-train` in a subprocess): a wheel install that
has its configs, W&B without an API key, one-line config errors, corrupt checkpoints told apart, a quiet
console, config nodes that show every argument. (Exact resume: tests/test_reliability_resume.py.)"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class

from sam_train.cli import CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent
SAM_TRAIN = Path(sys.executable).with_name("sam-train")
DEMO = ["fit", "recipe=medical_demo"]


def sam_train(*args: str, exe: Path = SAM_TRAIN, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600):
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `sam-train: error:` line of a failed command (and nothing like a trace around it)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("sam-train: error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------ 3. a real install
@pytest.mark.slow  # builds a wheel, makes a venv, runs the demo for 2 steps (its caching first): ~2 min on 2 cores
def test_wheel_install_has_configs_and_runs_the_demo(tmp_path):
    """The wheel (built from a clean copy of the tree) holds every config and recipe; installed without
    deps into a fresh venv that sees only this project's dependencies (not its editable checkout), its
    `sam-train fit recipe=medical_demo` runs from an unrelated directory, on the wheel's own code."""
    import zipfile

    def ignore(folder: str, names: list[str]) -> list[str]:  # no venv, build leftovers, run outputs, caches
        top = {".git", ".venv", "build", "dist", "runs", "data", "outputs", "wandb"} if Path(folder) == ROOT else set()
        return [n for n in names if n in top or n == "__pycache__" or n.endswith(".egg-info")]

    source = tmp_path / "src"
    shutil.copytree(ROOT, source, symlinks=True, ignore=ignore)
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source), "-w", wheels],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("sam_train-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    in_tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / "sam_train" / "configs").rglob("*.yaml")}
    assert in_tree and in_tree <= names, sorted(in_tree - names)  # every config and recipe is packaged
    assert "sam_train/configs/recipe/medical_demo.yaml" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.check_output([str(python), "-c", purelib], text=True).strip())
    # the dependencies come from the project's venv; a path in a .pth file is only added to sys.path (the
    # .pth files in that directory, the editable checkout's among them, are not processed)
    (site / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SAM_TRAIN_CONFIG_DIR")}
    where = subprocess.check_output([str(python), "-c", "import sam_train.cli as c; print(c.__file__, c.CONFIG_DIR)"],
                                    cwd=elsewhere, env=env, text=True).split()  # fmt: skip
    assert all(Path(p).resolve().is_relative_to(site.resolve()) for p in where), where  # the wheel's, not the checkout
    fit = sam_train(*DEMO, "trainer.max_steps=2", "~evaluate", f"run_dir={tmp_path / 'run'}",
                    f"data_root={tmp_path / 'data'}", exe=venv / "bin" / "sam-train", cwd=elsewhere, env=env)
    assert fit.returncode == 0, fit.stdout[-2000:] + fit.stderr[-3000:]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


# ------------------------------------------------------------------------------------------ 2. W&B without a key
@pytest.mark.slow  # a short W&B run with validation and evaluation: ~40 s on 2 cores
def test_wandb_without_api_key_logs_offline(tmp_path):
    """logger=wandb with no key anywhere (no WANDB_* variable, a fresh HOME): an offline run with the config,
    metrics, overlay images and checkpoints in it, and the `wandb sync` command printed."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env["HOME"] = str(home)
    run = tmp_path / "run"
    result = sam_train("fit", "trainer=cpu", "logger=wandb", "name=wandb_check", "trainer.max_steps=4",
                       "trainer.val_check_interval=2", "evaluate=default", "evaluate.num_overlays=2",
                       f"run_dir={run}", env=env)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    (offline,) = (run / "wandb").glob("offline-run-*")
    assert re.search(rf"wandb sync {re.escape(str(offline))}", output), output[-3000:]
    (log,) = offline.glob("run-*.wandb")  # W&B's transaction log of the run: what `wandb sync` uploads
    records = log.read_bytes()
    assert b"sam_train.lit.sam_module.SamModule" in records and b"wandb_check" in records  # the resolved config
    for metric in (b"train/loss", b"val/iou", b"eval/box/dice"):
        assert metric in records, metric
    assert b"last.ckpt" in records and b"model-" in records  # checkpoints recorded as model artifacts
    assert len(list(offline.glob("files/media/images/eval/overlays_*.png"))) == 2


# ------------------------------------------------------------------------------------------ 4. config mistakes
@pytest.mark.parametrize(
    ("override", "words"),
    [
        (["trainer.max_steps=abc"], ["trainer.max_steps: 'abc'", "integer >= 1"]),
        (["optim.optimizer.lr=-1"], ["optim.optimizer.lr: -1", "> 0"]),
        (["data.batch_size=0"], ["data.batch_size: 0", "integer >= 1"]),
        (["trainer.max_steps=20", "optim.scheduler.warmup_steps=20"],
         ["optim.scheduler.warmup_steps: 20", "trainer.max_steps=20", "< trainer.max_steps"]),
    ],
)
def test_config_mistake_is_one_line_naming_the_key(override, words, tmp_path):
    # rejected while the config is checked, within seconds (a run that got past that would be killed here)
    line = error_line(sam_train(*DEMO, *override, f"run_dir={tmp_path / 'run'}", f"data_root={tmp_path}", timeout=120))
    for word in words:
        assert word in line, (word, line)
    assert not (tmp_path / "run").exists()  # rejected before anything is written


# ------------------------------------------------------------------------------------------ 5. corrupt checkpoints
class NeedsCode:
    """A pickled instance of this makes weights_only refuse the file."""


def _checkpoints(folder: Path) -> dict[str, Path]:
    from sam_train.models import build_sam

    weights = build_sam("vit_t").state_dict()
    files = {name: folder / f"{name}.pth" for name in ("random", "truncated", "code", "other_model")}
    files["random"].write_bytes(os.urandom(4096))
    torch.save(weights, files["truncated"])
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:100_000])
    torch.save({"model": weights, "cfg": NeedsCode()}, files["code"])
    torch.save(build_sam("vit_t", img_size=128).state_dict(), files["other_model"])
    return files


@pytest.mark.slow  # four `sam-train fit` processes that stop at the model: ~30 s on 2 cores
def test_bad_checkpoint_is_told_apart(tmp_path):
    """model.checkpoint= a file of random bytes / a truncated file / a pickle needing code / another model's
    weights: four different one-line diagnoses naming the file."""
    files = _checkpoints(tmp_path)
    expected = {
        "random": "not a checkpoint",
        "truncated": "truncated or corrupt",
        "code": "needs arbitrary code",
        "other_model": "does not fit the model",
    }
    for name, path in files.items():
        line = error_line(sam_train("fit", "trainer=cpu", f"model.checkpoint={path}", f"run_dir={tmp_path / name}"))
        assert str(path) in line and expected[name] in line, (name, line)
        others = [v for k, v in expected.items() if k != name]
        assert not any(o in line for o in others), (name, line)


# ------------------------------------------------------------------------------------------ 6. a quiet console
@pytest.mark.slow  # a short fit with validation and evaluation: ~30 s on 2 cores
def test_console_is_quiet(tmp_path):
    """A short `sam-train fit` with validation and evaluation prints one progress bar counting steps with the
    loss and val metric, the evaluation table and the run directory: no Lightning line twice, no tips, no
    warnings a user cannot act on. A budget shorter than the warm-up (10) shortens it, naming both keys."""
    run = tmp_path / "run"
    result = sam_train("fit", "trainer=cpu", "trainer.max_steps=5", "trainer.val_check_interval=5", "evaluate=default",
                       "evaluate.num_overlays=1", "+data.pin_memory=true", f"run_dir={run}")  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", output).replace("\r", "\n")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for noise in ("Tip:", "litlogger", "GPU available", "Seed set", "/-2", "pin_memory", "set_vital", "LeafSpec",
                  "flops_per_batch", "weights_only", "Traceback", "Name     ┃ Type"):  # fmt: skip
        assert noise not in text, (noise, text[-3000:])
    (warning,) = [line for line in lines if line.startswith("WARNING")]
    assert "optim.scheduler.warmup_steps=10" in warning and "trainer.max_steps=5" in warning, warning
    assert re.search(r"epoch \d+ .*5/5 .*train/loss: [\d.]+", text), text[-3000:]  # one bar over all steps
    assert "val/iou" in text and "box dice" in text  # validation metric, evaluation table
    assert lines[-1] == f"run directory: {run}", lines[-5:]
    assert "GPU available" in (run / "fit.log").read_text()  # the log file keeps Lightning's INFO lines


# ------------------------------------------------------------------------------------------ 7. complete config nodes
@pytest.mark.parametrize("group", ["loss", "prompts"])
def test_config_nodes_show_every_constructor_argument(group):
    """A recipe can only change what its config node shows: each node lists all arguments of its _target_."""
    for option in sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")):
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            node = compose("fit", overrides=[f"{group}={option}"])[group]
        parameters = inspect.signature(get_class(node._target_)).parameters
        missing = sorted(set(parameters) - set(node))
        assert not missing, f"{group}/{option}.yaml lacks {missing}"
