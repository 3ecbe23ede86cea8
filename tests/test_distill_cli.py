"""`sam-train distill` end to end on CPU with a tiny random teacher (vit_t) and student (vit_t, 2 blocks):
one-line errors, the checkpoint it writes loads with build_sam and through `sam-train eval`, DDP (2 processes,
gloo) equals 1 process with the same global batch, and a SIGKILL + rerun reproduces the uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_cli import sam_train
from test_reliability_ddp import free_port
from test_reliability_resume import ckpt_step, env, fault, losses

TINY = [
    "trainer=cpu", "teacher=vit_t", "student=vit_t", "allow_random_teacher=true",
    "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "+logger.csv.flush_logs_every_n_steps=1",
    "optim.scheduler.warmup_steps=1", "evaluate.max_batches=1", "evaluate.num_overlays=0",
]  # fmt: skip
REQUIRED = ("teacher_box_dice", "student_box_dice", "embedding_mse", "student_images_per_s", "teacher_images_per_s")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")  # the MNI demo is prepared here on first use


def distill_cmd(run_dir: Path, data_root: Path, *extra: str, student_depth: int | None = 2) -> list[str]:
    depth = [] if student_depth is None else [f"+student.encoder_depth={student_depth}"]
    return [sys.executable, "-m", "sam_train.cli", "distill", *TINY, *depth, f"run_dir={run_dir}",
            f"data_root={data_root}", *extra]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["teacher=vit_h"], ["teacher=vit_h has no weights", "teacher.checkpoint="]),
        (["teacher=vit_t", "student=lite_medsam_tiny", "allow_random_teacher=true"],
         ["student: embedding [256, 64, 64]", "teacher's [64, 16, 16]"]),
        (["stage1.mode=distil"], ["stage1.mode=distil", "embedding, sami"]),
        (["teacher=vit_q"], ["teacher/vit_q", "lite_medsam", "vit_h"]),
    ],
)
def test_bad_input_gives_one_line_error(args, expected, tmp_path):
    out = sam_train("distill", *args, f"run_dir={tmp_path / 'run'}", f"data_root={tmp_path}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("sam-train: error:")]
    assert len(lines) == 1, out.stderr
    for word in expected:
        assert word in lines[0], (word, lines[0])


@pytest.mark.slow  # two CLI runs: ~1 min on 2 cores
def test_distill_writes_metrics_and_a_student_checkpoint_every_command_loads(tmp_path, data_root):
    from sam_train.models import build_sam

    run_dir = tmp_path / "run"
    result = run(distill_cmd(run_dir, data_root, "stage1.trainer.max_steps=3", "stage2.enabled=true",
                             "stage2.trainer.max_steps=2", "baseline.enabled=true"))
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in (*REQUIRED, "baseline_box_dice"):
        assert isinstance(metrics[key], float) and metrics[key] >= 0, (key, metrics.get(key))
    assert metrics["steps"]["stage1"] == 3 and metrics["steps"]["stage2"] == 2 and metrics["steps"]["baseline"] >= 1
    budget = metrics["wall_clock_s"]["stage1"] + metrics["wall_clock_s"]["stage2"]
    assert metrics["wall_clock_s"]["baseline"] < budget + 30  # stopped by the distillation's wall-clock
    assert len(list((run_dir / "teacher_embeddings").glob("embeddings-*.safetensors"))) == 1

    student = build_sam("vit_t", encoder_depth=2, checkpoint=run_dir / "student_sam.pth")  # strict load
    torch.manual_seed(0)
    teacher = build_sam("vit_t")  # the random teacher distill drew after seed_everything(0)
    for part in ("prompt_encoder", "mask_decoder"):  # the teacher's, frozen through both stages
        ours, theirs = getattr(student, part).state_dict(), getattr(teacher, part).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), part

    out = sam_train("eval", "model=vit_t", "+model.encoder_depth=2", f"checkpoint={run_dir / 'student_sam.pth'}",
                    "data=mni_demo", f"data_root={data_root}", "evaluate@_global_=default", "volumes.enabled=false",
                    "num_overlays=0", f"run_dir={tmp_path / 'eval'}")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "eval" / "metrics.json").read_text())["summary"]
    # the same held-out box protocol as the distill report (which saw only its first batch)
    assert 0.0 <= summary["eval/box/dice"] <= 1.0


def _student_params(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow  # three CLI processes: ~1.5 min on 2 cores
def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, data_root):
    # SGD: AdamW would turn the rounding noise of zero-gradient entries (the key bias) into full-size steps
    common = ["stage1.trainer.max_steps=3", "optim.optimizer._target_=torch.optim.SGD", "~optim.optimizer.betas",
              "stage1.optim.optimizer.lr=0.05"]
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    result = run(distill_cmd(single_dir, data_root, *common, "distill_data.batch_size=4"))
    assert result.returncode == 0, result.stderr[-4000:]

    cmd = distill_cmd(ddp_dir, data_root, *common, "distill_data.batch_size=2", "trainer.devices=2",
                      "trainer.strategy=ddp")
    base = {k: v for k, v in env().items() if not k.startswith(("SLURM_", "PMI_", "OMPI_"))}
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", NODE_RANK="0")
    logs = [open(tmp_path / f"rank{r}.log", "w+") for r in range(2)]
    procs = [subprocess.Popen(cmd, env={**base, "LOCAL_RANK": str(r)}, stdout=logs[r], stderr=subprocess.STDOUT)
             for r in range(2)]
    try:
        deadline = time.monotonic() + 400
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    assert [p.returncode for p in procs] == [0, 0], (outputs[0][-3000:], outputs[1][-3000:])
    # rank 0 alone cached the teacher's embeddings, the other rank read them
    assert "caching the teacher's embeddings" in outputs[0] and "caching" not in outputs[1]

    single, ddp = _student_params(single_dir / "student_sam.pth"), _student_params(ddp_dir / "student_sam.pth")
    initial = _initial_student()
    moved = [k for k in initial if not torch.equal(single[k], initial[k])]
    assert len(moved) > 20 and all(k.startswith("image_encoder.") for k in moved)
    for key in single:
        assert torch.allclose(single[key], ddp[key], atol=1e-6, rtol=1e-5), key


def _initial_student() -> dict[str, torch.Tensor]:
    """The student `sam-train distill` builds with seed 0 (see sam_train.distill.run.build_student)."""
    from sam_train.distill.models import with_teacher_decoder
    from sam_train.distill.run import inherit_matching
    from sam_train.models import build_sam

    torch.manual_seed(0)
    teacher = build_sam("vit_t")
    torch.manual_seed(1)
    student = build_sam("vit_t", encoder_depth=2)
    inherit_matching(student.image_encoder, teacher.image_encoder, ["neck."])
    return with_teacher_decoder(student, teacher).state_dict()


@pytest.mark.slow  # three CLI runs: ~2 min on 2 cores
def test_sigkill_in_stage1_then_rerun_reproduces_the_uninterrupted_run(tmp_path, data_root):
    """Stage 1 (8 steps, last.ckpt every 2) then stage 2 (4 steps): SIGKILL in the middle of a random stage-1
    step; rerunning the same command resumes stage 1, runs stage 2, and every logged loss and the final
    student equal those of an uninterrupted run."""
    stages = ["stage1.trainer.max_steps=8", "stage2.enabled=true", "stage2.trainer.max_steps=4",
              "trainer.deterministic=true", "callbacks.model_checkpoint.every_n_train_steps=2"]
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    result = run(distill_cmd(ref_dir, data_root, *stages))
    assert result.returncode == 0, result.stderr[-4000:]
    reference = {s: {k: v[0] for k, v in losses(ref_dir / s).items()} for s in ("stage1", "stage2")}
    assert sorted(reference["stage1"]) == list(range(8)) and sorted(reference["stage2"]) == list(range(4))

    kill_step = random.randint(3, 6)
    killer = [f"+stage1.{o[1:]}" for o in fault("SIGKILL", kill_step)]  # the fault in stage 1 only
    result = run(distill_cmd(run_dir, data_root, *stages, *killer))
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    resume_step = ckpt_step(run_dir / "stage1" / "checkpoints" / "last.ckpt")
    assert 2 <= resume_step <= kill_step
    assert not (run_dir / "stage2").exists()

    result = run(distill_cmd(run_dir, data_root, *stages))
    assert result.returncode == 0, result.stderr[-4000:]
    for stage, ref in reference.items():
        after = losses(run_dir / stage)
        assert sorted(after) == sorted(ref), (stage, kill_step)
        for step, values in after.items():  # the steps computed twice have the same loss both times
            assert values == pytest.approx([ref[step]] * len(values), rel=0, abs=1e-6), (stage, step, kill_step)
    ours, theirs = _student_params(run_dir / "student_sam.pth"), _student_params(ref_dir / "student_sam.pth")
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=0) for k in theirs), kill_step
    assert os.path.getsize(run_dir / "metrics.json") > 0


@pytest.mark.parametrize("recipe", ["distill_demo", "distill_mobile_sam"])
def test_distill_recipes_compose_with_a_student_of_the_teachers_shape(recipe):
    from hydra import compose, initialize_config_dir

    from sam_train.cli import CONFIG_DIR
    from sam_train.models.configs import sam_config

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("distill", overrides=[f"recipe={recipe}"])
    teacher, student = sam_config(cfg.teacher.name), sam_config(cfg.student.name)
    assert (teacher.img_size, teacher.embed_size, teacher.prompt_embed_dim) == (
        student.img_size, student.embed_size, student.prompt_embed_dim)
    assert cfg.stage1.mode == "embedding" and cfg.name == recipe
    if recipe == "distill_mobile_sam":  # ViT-H -> TinyViT-5M at 1024 px; the teacher must come with weights
        assert (cfg.teacher.name, cfg.student.name, teacher.img_size) == ("vit_h", "mobile_sam", 1024)
        assert cfg.teacher.checkpoint is None  # `sam-train distill` refuses a teacher without weights
        assert OmegaConf.missing_keys(cfg) == {"distill_data.train.urls", "data.val.urls"}


@pytest.mark.slow  # one CLI run: ~1 min on 2 cores
def test_sami_mode_pretrains_the_student_encoder_with_the_mae_code(tmp_path, data_root):
    """stage1.mode=sami: the MAE (vit_t's encoder) learns the teacher's features from masked inputs; its
    blocks then are the student's encoder blocks (the neck stays the one inherited from the teacher)."""
    run_dir = tmp_path / "run"
    result = run(distill_cmd(run_dir, data_root, "stage1.mode=sami", "mae_model=mae_vit_t", "mae_data=mni_demo",
                             "mae_data.batch_size=4", "stage1.trainer.max_steps=3", student_depth=None))
    assert result.returncode == 0, result.stderr[-4000:]
    rows = losses(run_dir / "stage1")
    assert sorted(rows) == [0, 1, 2]
    mae = torch.load(run_dir / "stage1" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    student = _student_params(run_dir / "student_sam.pth")
    blocks = [k for k in student if k.startswith("image_encoder.blocks.") and ".rel_pos" not in k]
    assert len(blocks) > 20
    for key in blocks:
        assert torch.equal(student[key], mae["state_dict"]["model.mae." + key[len("image_encoder."):]]), key
    assert json.loads((run_dir / "metrics.json").read_text())["student_box_dice"] >= 0
