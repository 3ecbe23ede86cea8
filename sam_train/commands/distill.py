"""`sam-train distill` (configs/distill.yaml): stages, export, held-out report.

Every stage is a Lightning run of its own in `<run_dir>/<stage>/` (checkpoints, logs), built by
`commands.build.build_trainer` from the root config with the stage's `trainer` / `optim` deltas merged over
it. Rerunning the command with the same `run_dir=` resumes the stage that was interrupted (a finished stage
restores its last checkpoint and returns at once).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from sam_train.commands.build import (
    build_trainer,
    check_required,
    device,
    fit_or_requeue,
    prepare_run_dir,
    resume_checkpoint,
    seed_and_precision,
)
from sam_train.commands.eval import eval_config
from sam_train.distill.models import check_compatible, freeze, with_teacher_decoder
from sam_train.distill.run import (
    BASELINE_MAX_STEPS,
    MODES,
    inherit_matching,
    max_time,
    read_wall_clock,
    summarize,
    write_wall_clock,
)
from sam_train.errors import SamTrainError
from sam_train.models.sam import Sam

log = logging.getLogger(__name__)
STAGE_DELTAS = ("trainer", "optim", "callbacks")


# ----------------------------------------------------------------------------------- models
def build_teacher(cfg: DictConfig) -> Sam:
    """The frozen teacher; one-line error when it would have random weights."""
    node = cfg.teacher
    if not (node.get("checkpoint") or node.get("pretrained")) and not cfg.get("allow_random_teacher"):
        raise SamTrainError(
            f"teacher={node.get('name')} has no weights: set teacher.checkpoint=<file> (any SAM layout)"
            + (" or teacher.pretrained=true" if "pretrained" in node else "")
        )
    return freeze(instantiate(node))


def build_student(cfg: DictConfig, teacher: Sam) -> Sam:
    """The student SAM: its encoder (seeded init, matching teacher tensors inherited), the teacher's frozen
    prompt encoder and mask decoder. The same seed gives the same student (stage 1 and the baseline)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)  # not the stream a random (test) teacher of the same size was drawn from
        student = instantiate(cfg.student)
    check_compatible(teacher, student)
    if not cfg.student.get("checkpoint"):
        names = inherit_matching(student.image_encoder, teacher.image_encoder, list(cfg.inherit_from_teacher or []))
        log.info("student encoder: %d tensors inherited from the teacher (%s)", len(names), ", ".join(names))
    return with_teacher_decoder(student, teacher)


# ----------------------------------------------------------------------------------- stages
def stage_config(cfg: DictConfig, stage: str, extra: dict[str, Any] | None = None) -> DictConfig:
    """The root config with the stage's deltas (`trainer`, `optim`, `callbacks`, then `extra`) merged over it and
    run_dir = <run_dir>/<stage> (checkpoints, logs and callbacks of the stage go there)."""
    section = cfg.get(stage) or {}
    deltas = [{k: section[k]} for k in STAGE_DELTAS if section.get(k) is not None]
    base = cfg.copy()
    OmegaConf.set_struct(base, False)  # deltas may add trainer keys (max_time)
    out = OmegaConf.merge(base, *deltas, extra or {})
    out.run_dir = str(Path(cfg.run_dir) / stage)
    return out  # type: ignore[return-value]


def run_stage(scfg: DictConfig, module: pl.LightningModule, datamodule: pl.LightningDataModule) -> dict[str, Any]:
    """Fit `module` in the stage's run directory (resuming from its last checkpoint; a stage an earlier run
    finished only loads its final weights); returns the stage's accumulated wall-clock seconds and steps, also
    kept in <stage dir>/wall_clock.json."""
    stage_dir = Path(scfg.run_dir)
    (stage_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    clock = read_wall_clock(stage_dir)
    last = stage_dir / "checkpoints" / "last.ckpt"
    if clock["complete"] and last.is_file():  # finished in an earlier run: its final weights, no refit
        from sam_train.callbacks import load_weights_only

        module.load_state_dict(load_weights_only(last)["state_dict"])
        log.info("%s: done in an earlier run (%d steps), weights from %s", stage_dir.name, clock["steps"], last)
        return clock
    trainer = build_trainer(scfg, stage_dir)
    start, finished = time.perf_counter(), False
    try:
        fit_or_requeue(trainer, module, datamodule, resume_checkpoint(scfg, stage_dir))
        if trainer.global_step < scfg.trainer.max_steps:  # stopped by max_time: keep the final weights too
            trainer.save_checkpoint(last, weights_only=False)
        finished = True
    finally:  # the time of every run of the stage counts
        clock = {"seconds": clock["seconds"] + time.perf_counter() - start, "steps": trainer.global_step,
                 "complete": finished}
        if trainer.is_global_zero:
            write_wall_clock(stage_dir, clock)
    log.info("%s: %d steps, %.0f s", stage_dir.name, clock["steps"], clock["seconds"])
    return clock


def embedding_stage(cfg: DictConfig, student: Sam, teacher: Sam) -> dict[str, Any]:
    """Stage 1, MobileSAM: the student's encoder regresses the teacher's embeddings (cached or on the fly)."""
    scfg = stage_config(cfg, "stage1")
    datamodule = instantiate(cfg.distill_data)
    datamodule.teacher = teacher  # encodes the cache on global rank 0 (prepare_data)
    on_the_fly = not datamodule.cached
    module = instantiate(scfg.module, model=student, teacher=teacher if on_the_fly else None)
    return run_stage(scfg, module, datamodule)


def sami_stage(cfg: DictConfig, student: Sam, teacher: Sam) -> dict[str, Any]:
    """Stage 1, EfficientSAM's SAMI: masked-input MAE regressing the teacher's features, then its encoder
    goes into the student (a ViT SAM of the MAE's width / depth / heads)."""
    from sam_train.distill.sami import SamiModel
    from sam_train.export.mae_to_sam import mae_to_sam_state_dict

    if cfg.get("mae_model") is None or cfg.get("mae_data") is None:
        raise SamTrainError("stage1.mode=sami needs mae_model=<mae size of the student> and mae_data=<images>")
    scfg = stage_config(cfg, "stage1", {"callbacks": {"throughput": None}})  # MAE batches are plain tensors
    model = SamiModel(mae=instantiate(cfg.mae_model), teacher=teacher, masked_only=cfg.sami.masked_only)
    clock = run_stage(scfg, instantiate(scfg.sami.module, model=model), instantiate(cfg.mae_data))
    overrides = {k: v for k, v in OmegaConf.to_container(cfg.student, resolve=True).items()
                 if k not in ("_target_", "name", "checkpoint", "pretrained")}
    try:
        sd = mae_to_sam_state_dict(model.mae.state_dict(), cfg.student.name, seed=cfg.seed, **overrides)
    except (KeyError, TypeError, ValueError) as exc:
        raise SamTrainError(f"stage1.mode=sami: the MAE does not fit student={cfg.student.name}: {exc}") from exc
    neck = {k: v for k, v in student.state_dict().items() if k.startswith("image_encoder.neck.")}
    student.load_state_dict({**sd, **neck}, strict=False)  # the (inherited) neck stays: SAMI trains no neck
    return clock


def finetune_stage(cfg: DictConfig, student: Sam, stage: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """SAM loss on labelled data (`data`), the teacher's prompt encoder + mask decoder frozen unless
    stage2.train_decoder (stage 2, and the baseline from the student's initialisation)."""
    for part in (student.prompt_encoder, student.mask_decoder):
        part.requires_grad_(bool(cfg.stage2.train_decoder))
    scfg = stage_config(cfg, stage, extra)
    return run_stage(scfg, instantiate(scfg.sam_module, model=student), instantiate(cfg.data))


# ----------------------------------------------------------------------------------- report
def held_out_report(cfg: DictConfig, teacher: Sam, students: dict[str, Sam], run_dir: Path) -> dict[str, Any]:
    from sam_train.distill.report import compare_on_held_out

    config = eval_config(cfg.evaluate, seed=cfg.seed)
    dev = device(config.device)
    datamodule = instantiate(cfg.data, train=None)
    if datamodule.val is None:
        raise SamTrainError("data.val is null: the held-out report needs the labelled data's val split")
    teacher.to(dev)
    for s in students.values():
        s.to(dev)
    return compare_on_held_out(
        teacher, students, datamodule.val_dataloader(), config, run_dir / "eval", dataset=datamodule.val,
        warmup_batches=int(cfg.throughput.warmup_batches),
    )


def distill(cfg: DictConfig) -> dict[str, Any]:
    """`sam-train distill`: stages as configured, then the student checkpoint and <run_dir>/metrics.json."""
    check_required(cfg)
    if cfg.stage1.mode not in MODES:
        raise SamTrainError(f"stage1.mode={cfg.stage1.mode}: expected one of {', '.join(MODES)}")
    seed_and_precision(cfg)
    run_dir = prepare_run_dir(cfg)
    cfg.run_dir = str(run_dir)  # one timestamp for every stage
    teacher = build_teacher(cfg)
    student = build_student(cfg, teacher)
    clocks: dict[str, dict[str, Any]] = {}
    if cfg.stage1.enabled:
        stage = embedding_stage if cfg.stage1.mode == "embedding" else sami_stage
        clocks["stage1"] = stage(cfg, student, teacher)
    if cfg.stage2.enabled:
        clocks["stage2"] = finetune_stage(cfg, student, "stage2")
    students = {"student": student}
    if cfg.baseline.enabled:
        budget = sum(c["seconds"] for c in clocks.values())
        if not (budget > 0 or cfg.baseline.max_steps):
            raise SamTrainError("baseline.enabled=true without a distillation stage to time it: set baseline.max_steps")
        trainer = {**(OmegaConf.to_container(cfg.stage2.trainer) or {}),
                   **(OmegaConf.to_container(cfg.baseline.trainer) or {}),
                   "max_steps": int(cfg.baseline.max_steps or BASELINE_MAX_STEPS)}
        if budget > 0:
            trainer["max_time"] = max_time(budget)
        students["baseline"] = build_student(cfg, teacher)
        clocks["baseline"] = finetune_stage(cfg, students["baseline"], "baseline", {"trainer": trainer})
    if rank_zero_only.rank != 0:  # DDP: the other ranks are done
        return {}
    from sam_train.eval.report import write_metrics_json
    from sam_train.models.checkpoint import save_sam_checkpoint

    checkpoint = save_sam_checkpoint(student, run_dir / "student_sam.pth")
    log.info("student checkpoint: %s (build_sam(%r, checkpoint=...))", checkpoint, cfg.student.name)
    results = held_out_report(cfg, teacher, students, run_dir)
    metrics = summarize(results, clocks, teacher=cfg.teacher.name, student=cfg.student.name,
                        checkpoint=str(checkpoint))
    write_metrics_json(metrics, run_dir / "metrics.json")
    keys = ("teacher_box_dice", "student_box_dice", "baseline_box_dice", "embedding_mse",
            "teacher_images_per_s", "student_images_per_s", "student_speedup")
    print("\n".join(f"{k:<22} {metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), float)))
    log.info("metrics written to %s", run_dir / "metrics.json")
    return metrics


main = distill
