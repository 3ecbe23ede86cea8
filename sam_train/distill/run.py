"""Library entry point behind `sam-train distill` (configs/distill.yaml): stages, export, held-out report.

Every stage is a Lightning run of its own in `<run_dir>/<stage>/` (checkpoints, logs), built by the
trainer / logger / callback builders of `sam_train.train` from the root config with the stage's
`trainer` / `optim` deltas merged over it. Rerunning the command with the same `run_dir=` resumes the
stage that was interrupted (a finished stage restores its last checkpoint and returns at once).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from sam_train.distill.models import check_compatible, freeze, with_teacher_decoder
from sam_train.errors import SamTrainError
from sam_train.models.sam import Sam
from sam_train.pretrain import check_required
from sam_train.train import build_trainer, prepare_run_dir, resume_checkpoint

log = logging.getLogger(__name__)
STAGE_DELTAS = ("trainer", "optim", "callbacks")
MODES = ("embedding", "sami")
# The baseline stops at the distillation's wall-clock; this only caps it (its cosine schedule over so many
# steps stays at the peak lr after warm-up: a constant-lr baseline, whatever step rate it reaches).
BASELINE_MAX_STEPS = 1_000_000


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


def inherit_matching(student: torch.nn.Module, teacher: torch.nn.Module, prefixes: list[str]) -> list[str]:
    """Copy the teacher's tensors into the student where the name starts with a prefix and the shape matches."""
    own = student.state_dict()
    taken = {k: v for k, v in teacher.state_dict().items()
             if k.startswith(tuple(prefixes)) and k in own and own[k].shape == v.shape}
    student.load_state_dict(taken, strict=False)
    return sorted(taken)


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


def _wall_clock(stage_dir: Path) -> dict[str, Any]:
    path = stage_dir / "wall_clock.json"
    return json.loads(path.read_text()) if path.is_file() else {"seconds": 0.0, "steps": 0, "complete": False}


def run_stage(scfg: DictConfig, module: pl.LightningModule, datamodule: pl.LightningDataModule) -> dict[str, Any]:
    """Fit `module` in the stage's run directory (resuming from its last checkpoint; a stage an earlier run
    finished only loads its final weights); returns the stage's accumulated wall-clock seconds and steps, also
    kept in <stage dir>/wall_clock.json."""
    stage_dir = Path(scfg.run_dir)
    (stage_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    clock = _wall_clock(stage_dir)
    last = stage_dir / "checkpoints" / "last.ckpt"
    if clock["complete"] and last.is_file():  # finished in an earlier run: its final weights, no refit
        from sam_train.callbacks import load_weights_only

        module.load_state_dict(load_weights_only(last)["state_dict"])
        log.info("%s: done in an earlier run (%d steps), weights from %s", stage_dir.name, clock["steps"], last)
        return clock
    trainer = build_trainer(scfg, stage_dir)
    start, finished = time.perf_counter(), False
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(scfg, stage_dir), weights_only=True)
        if trainer.global_step < scfg.trainer.max_steps:  # stopped by max_time: keep the final weights too
            trainer.save_checkpoint(last, weights_only=False)
        finished = True
    except SIGTERMException as exc:  # preempted: rerunning the command resumes this stage
        from sam_train.callbacks import EXIT_REQUEUE

        raise SystemExit(exc.code if isinstance(exc.code, int) and exc.code else EXIT_REQUEUE) from exc
    finally:  # the time of every run of the stage counts
        clock = {"seconds": clock["seconds"] + time.perf_counter() - start, "steps": trainer.global_step,
                 "complete": finished}
        if trainer.is_global_zero:
            (stage_dir / "wall_clock.json").write_text(json.dumps(clock))
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


def max_time(seconds: float) -> str:
    """Lightning's "DD:HH:MM:SS" for a wall-clock budget (rounded up to whole seconds)."""
    s = max(1, math.ceil(seconds))
    return f"{s // 86400:02d}:{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


# ----------------------------------------------------------------------------------- report
def held_out_report(cfg: DictConfig, teacher: Sam, students: dict[str, Sam], run_dir: Path) -> dict[str, Any]:
    from sam_train.distill.report import compare_on_held_out
    from sam_train.eval.run import _opts, pick_device

    opts = {"seed": cfg.seed, **_opts(cfg.evaluate)}
    device = pick_device(opts.get("device"))
    datamodule = instantiate(cfg.data, train=None)
    if datamodule.val is None:
        raise SamTrainError("data.val is null: the held-out report needs the labelled data's val split")
    teacher.to(device)
    for s in students.values():
        s.to(device)
    return compare_on_held_out(
        teacher, students, datamodule.val_dataloader(), opts, run_dir / "eval", dataset=datamodule.val,
        warmup_batches=int(cfg.throughput.warmup_batches),
    )


def summarize(results: dict[str, dict[str, Any]], clocks: dict[str, dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The flat metrics.json: the figures the issue names first, then ratios, wall-clock and details."""
    t, s = results["teacher"], results["student"]
    out: dict[str, Any] = {
        "teacher_box_dice": t["box_dice"],
        "student_box_dice": s["box_dice"],
        "embedding_mse": s["embedding_mse"],
        "student_images_per_s": s["images_per_s"],
        "teacher_images_per_s": t["images_per_s"],
    }
    if t["box_dice"] and s["box_dice"] is not None:
        out["student_dice_over_teacher"] = s["box_dice"] / t["box_dice"]
    if t["images_per_s"] and s["images_per_s"]:
        out["student_speedup"] = s["images_per_s"] / t["images_per_s"]
    out["student_teacher_agreement_dice"] = s["teacher_agreement_dice"]
    if "baseline" in results:
        b = results["baseline"]
        out.update(baseline_box_dice=b["box_dice"], baseline_embedding_mse=b["embedding_mse"],
                   baseline_teacher_agreement_dice=b["teacher_agreement_dice"])
    out["filled_box_dice"] = t["summary"].get("eval/filled_box/dice")
    out["timed_images"] = t["timed_images"]
    out["wall_clock_s"] = {k: v["seconds"] for k, v in clocks.items()}
    out["steps"] = {k: v["steps"] for k, v in clocks.items()}
    out.update(extra)
    out["summaries"] = {k: v["summary"] for k, v in results.items()}
    return out


def distill(cfg: DictConfig) -> dict[str, Any]:
    """`sam-train distill`: stages as configured, then the student checkpoint and <run_dir>/metrics.json."""
    check_required(cfg)
    if cfg.stage1.mode not in MODES:
        raise SamTrainError(f"stage1.mode={cfg.stage1.mode}: expected one of {', '.join(MODES)}")
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("matmul_precision") and torch.cuda.is_available():
        torch.set_float32_matmul_precision(cfg.matmul_precision)
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
