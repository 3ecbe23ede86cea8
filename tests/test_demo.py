"""README's main job end to end: `sam-train fit recipe=medical_demo` (few steps), then `sam-train eval`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sam_train(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("sam-train")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_medical_demo_fit_then_eval(tmp_path):
    data_root, run = tmp_path / "data", tmp_path / "fit"
    fit = sam_train(
        "fit",
        "recipe=medical_demo",
        f"data_root={data_root}",
        f"run_dir={run}",
        "trainer.max_steps=4",
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=2",
        "optim.scheduler.warmup_steps=1",
        "evaluate.num_overlays=2",
        "data.train.slice_step=6",  # 10 slices instead of 60: the test's budget
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    after_fit = json.loads((run / "metrics.json").read_text())
    for mode in ("box", "filled_box", "objects/box", "objects/clicks_5", "objects_initial/box"):
        dice = after_fit["summary"][f"eval/{mode}/dice"]
        assert 0.0 <= dice <= 1.0 and math.isfinite(dice)
    # the baseline is a real computation on the held-out cases, not a constant
    assert 0.05 < after_fit["summary"]["eval/filled_box/dice"] < 0.95
    assert len(list((run / "overlays").glob("*.png"))) == 2
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    assert (data_root / "mni_subcortical" / "dataset.json").is_file()

    out = sam_train(
        "eval",
        f"checkpoint={run / 'checkpoints' / 'last.ckpt'}",
        "model=lite_medsam",
        "data=mni_subcortical",
        "data.train.slice_step=6",
        f"data_root={data_root}",
        f"run_dir={tmp_path / 'eval'}",
        "evaluate@_global_=default",
        "modes=[box,filled_box]",
        "objects.enabled=true",
        "num_overlays=0",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    # same checkpoint, same held-out cases, same prompts -> the same numbers as the evaluation after fit
    for key, value in after_fit["summary"].items():
        if not key.startswith("eval/objects_initial/"):  # the zero-shot comparison is only made after fit
            assert evaluated["summary"][key] == value, key
    assert evaluated["volumes"], "per-case 3D metrics of the medical volumes are reported"
