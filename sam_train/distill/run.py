"""Library pieces of `sam-train distill` (`sam_train.commands.distill` runs the stages): the student's
inherited tensors, the baseline's wall-clock budget, the stages' wall-clock record and the flat metrics.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

MODES = ("embedding", "sami")
# The baseline stops at the distillation's wall-clock; this only caps it (its cosine schedule over so many
# steps stays at the peak lr after warm-up: a constant-lr baseline, whatever step rate it reaches).
BASELINE_MAX_STEPS = 1_000_000
WALL_CLOCK = "wall_clock.json"


def inherit_matching(student: torch.nn.Module, teacher: torch.nn.Module, prefixes: list[str]) -> list[str]:
    """Copy the teacher's tensors into the student where the name starts with a prefix and the shape matches."""
    own = student.state_dict()
    taken = {k: v for k, v in teacher.state_dict().items()
             if k.startswith(tuple(prefixes)) and k in own and own[k].shape == v.shape}
    student.load_state_dict(taken, strict=False)
    return sorted(taken)


def read_wall_clock(stage_dir: Path) -> dict[str, Any]:
    """A stage's accumulated {"seconds", "steps", "complete"} (zeros before its first run)."""
    path = stage_dir / WALL_CLOCK
    return json.loads(path.read_text()) if path.is_file() else {"seconds": 0.0, "steps": 0, "complete": False}


def write_wall_clock(stage_dir: Path, clock: dict[str, Any]) -> None:
    (stage_dir / WALL_CLOCK).write_text(json.dumps(clock))


def max_time(seconds: float) -> str:
    """Lightning's "DD:HH:MM:SS" for a wall-clock budget (rounded up to whole seconds)."""
    s = max(1, math.ceil(seconds))
    return f"{s // 86400:02d}:{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


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
