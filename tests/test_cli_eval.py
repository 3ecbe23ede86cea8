"""`sam-train eval` and `sam-train export onnx` end to end in a subprocess, on a tiny vit_t checkpoint:
toy shapes (clicks, SAM-Med2D, PNG predictions, overlays) and, from a Lightning-layout checkpoint, the
MNI demo (NIfTI volumes with the image's geometry, 3D metrics) and the ONNX export."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sam_train.eval.saving import load_label_volume, load_png_labels, read_geometry
from sam_train.models import build_sam
from sam_train.models.checkpoint import save_sam_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def sam_train(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("sam-train")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The same random vit_t weights in the official layout and as a Lightning checkpoint."""
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = build_sam("vit_t")
    official = save_sam_checkpoint(model, folder / "tiny.pth")
    lightning = folder / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 2}, lightning)
    return {"official": official, "lightning": lightning}


def assert_unit_interval(values) -> None:
    for v in values:
        assert v is not None and math.isfinite(v) and 0.0 <= v <= 1.0, v


def test_eval_toy_writes_metrics_curve_overlays_predictions(checkpoints, tmp_path):
    run = tmp_path / "run"
    out = sam_train(
        "eval",
        f"checkpoint={checkpoints['official']}",
        f"run_dir={run}",
        "data.val.n=4",
        "data.batch_size=2",
        "clicks.max_clicks=3",
        "num_overlays=3",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "box dice" in out.stdout and "mean" in out.stdout  # the printed table
    m = json.loads((run / "metrics.json").read_text())
    s = m["summary"]
    for mode in ("box", "point", "filled_box"):
        assert_unit_interval([s[f"eval/{mode}/dice"], s[f"eval/{mode}/iou"]])
        assert_unit_interval([v["dice"] for v in m["prompted"][mode]["per_case"].values()])
    assert m["num_images"] == 4
    curve = m["clicks"]["mean_iou_curve"]
    assert len(curve) == 3 and m["clicks"]["max_clicks"] == 3
    assert_unit_interval(curve)
    assert 1.0 <= m["clicks"]["noc85"] <= 3.0 and m["clicks"]["noc85"] <= m["clicks"]["noc90"]
    assert set(m["sam_med2d"]["dice"]) == {"box", "1_point", "3_points", "5_points"}
    assert_unit_interval(m["sam_med2d"]["dice"].values())
    with Image.open(run / "iou_vs_clicks.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert len(list((run / "overlays").glob("*.png"))) == 3
    pngs = sorted((run / "predictions").glob("*.png"))
    assert len(pngs) == 4
    labels = load_png_labels(pngs[0])
    assert labels.shape == (64, 64)  # original size of the toy images, not the 256 px model input
    assert (run / "config.yaml").is_file()


def test_eval_mni_demo_saves_nifti_with_image_geometry(checkpoints, tmp_path):
    run = tmp_path / "run"
    out = sam_train(
        "eval",
        f"checkpoint={checkpoints['lightning']}",
        f"run_dir={run}",
        "data=mni_demo",
        f"data_root={tmp_path / 'data'}",
        "clicks.enabled=false",
        "sam_med2d.enabled=false",
        "num_overlays=2",
        "modes=[box,filled_box]",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "grey matter" in out.stdout  # 3D table with the dataset.json class names
    m = json.loads((run / "metrics.json").read_text())
    vol = m["volumes"]
    assert vol["incomplete_cases"] == [] and len(vol["files"]) == 2  # 6 slabs, 34% held out
    for case, path in vol["files"].items():
        pred, geometry = load_label_volume(path)
        image = tmp_path / "data" / "mni_demo" / "imagesTr" / f"{case}_0000.nii.gz"
        assert geometry.allclose(read_geometry(image))
        gt, _ = load_label_volume(tmp_path / "data" / "mni_demo" / "labelsTr" / f"{case}.nii.gz")
        assert pred.shape == gt.shape and set(np.unique(pred)) <= {0, 1, 2}
        for cls in ("grey matter", "white matter"):
            row = vol["per_case"][case][cls]
            assert_unit_interval([row["dice"], row["iou"], row["nsd"]])
            assert row["hd95"] is None or row["hd95"] >= 0
    assert_unit_interval([m["summary"]["eval/volume/dice"], m["summary"]["eval/filled_box/dice"]])
    assert len(list((run / "overlays").glob("*.png"))) == 2


def test_export_onnx_command_and_eval_errors(checkpoints, tmp_path):
    import onnxruntime as ort

    from sam_train.export.onnx import INPUT_NAMES

    out = sam_train("export", "onnx", f"checkpoint={checkpoints['lightning']}", f"out={tmp_path / 'dec.onnx'}")
    assert out.returncode == 0, out.stderr[-3000:]
    session = ort.InferenceSession(str(tmp_path / "dec.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == INPUT_NAMES

    bad = sam_train("eval", f"checkpoint={tmp_path / 'missing.pth'}", f"run_dir={tmp_path / 'bad'}")
    assert bad.returncode == 2
    assert (
        bad.stderr.strip().splitlines()[-1] == f"sam-train: error: checkpoint={tmp_path / 'missing.pth'}: no such file"
    )


@pytest.mark.slow
def test_eval_of_a_fit_checkpoint_reproduces_the_evaluation_after_fit(tmp_path):
    fit = sam_train(
        "fit",
        "trainer=cpu",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        f"run_dir={tmp_path / 'fit'}",
        "data.train.n=8",
        "data.val.n=4",
        "data.batch_size=2",
        "optim.scheduler.warmup_steps=1",
        "prompts.num_iterations=2",
        "prompts.num_mask_only=1",
        "evaluate=default",
        "evaluate.num_overlays=2",
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert len(list((tmp_path / "fit" / "overlays").glob("*.png"))) == 2
    out = sam_train(
        "eval",
        f"checkpoint={tmp_path / 'fit' / 'checkpoints' / 'last.ckpt'}",
        f"run_dir={tmp_path / 'eval'}",
        "data.val.n=4",
        "data.batch_size=2",
        "evaluate@_global_=default",
        "num_overlays=0",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    after_fit, evaluated = (json.loads((tmp_path / k / "metrics.json").read_text()) for k in ("fit", "eval"))
    assert after_fit["summary"] == evaluated["summary"]
    assert set(after_fit["summary"]) == {
        f"eval/{m}/{k}" for m in ("box", "point", "filled_box") for k in ("dice", "iou")
    }
