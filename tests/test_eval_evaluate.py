"""evaluate_predictions end to end on synthetic NIfTI cases: metrics recomputed from the saved files
equal the reported ones; overlays."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image
from scipy import ndimage

from sam_train.eval.evaluate import evaluate_predictions
from sam_train.eval.metrics import case_metrics
from sam_train.eval.overlays import draw_overlay, largest_slice, save_overlays, to_uint8
from sam_train.eval.saving import load_label_volume, save_label_volume

CLASSES = {1: "liver", 2: "kidney"}


def make_reference(path, shape_zyx, spacing) -> str:
    """A float image with anisotropic spacing, an offset origin and a tilted direction."""
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 100, shape_zyx).astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin((-4.0, 2.0, 7.5))
    c, s = np.cos(0.2), np.sin(0.2)
    image.SetDirection((1.0, 0.0, 0.0, 0.0, c, -s, 0.0, s, c))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return str(path)


def _case(rng, shape):
    def blob():
        f = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
        return f > np.quantile(f, 0.75)

    gt = blob().astype(np.int64)
    gt[blob() & (gt == 0)] = 2
    pred = gt.copy()
    pred[blob()] = 1
    return pred, gt


@pytest.fixture
def nifti_cases(tmp_path):
    """Two cases with different anisotropic spacings; in case_b the kidney is missed (HD95 inf)."""
    rng = np.random.default_rng(0)
    cases = {}
    for name, spacing in [("case_a", (0.8, 0.8, 3.0)), ("case_b", (1.2, 0.6, 2.0))]:
        ref = make_reference(tmp_path / "images" / f"{name}.nii.gz", shape_zyx=(8, 12, 14), spacing=spacing)
        pred, gt = _case(rng, (8, 12, 14))
        if name == "case_b":
            pred[pred == 2] = 0
        save_label_volume(pred, ref, tmp_path / "pred" / f"{name}.nii.gz")
        save_label_volume(gt, ref, tmp_path / "gt" / f"{name}.nii.gz")
        cases[name] = (pred, gt, spacing[::-1], ref)
    return cases


def test_metrics_from_files_equal_reported(tmp_path, nifti_cases, capsys):
    out_dir = tmp_path / "eval"
    result = evaluate_predictions(
        tmp_path / "pred", tmp_path / "gt", classes=CLASSES, tolerance_mm=1.5, per_slice=True, out_dir=out_dir
    )
    printed = capsys.readouterr().out
    assert "liver" in printed and "kidney" in printed and "mean" in printed

    def reject(token):
        raise AssertionError(f"metrics.json holds non-standard JSON {token}")

    reported = json.loads((out_dir / "metrics.json").read_text(), parse_constant=reject)
    assert (out_dir / "metrics_table.txt").read_text().strip() == printed.strip()
    assert sorted(reported["per_case"]) == ["case_a", "case_b"]
    for name, (pred, gt, spacing_zyx, ref) in nifti_cases.items():
        # anyone can recompute: reload the saved files, take spacing from the image header
        pred_back, geom = load_label_volume(tmp_path / "pred" / f"{name}.nii.gz")
        gt_back, _ = load_label_volume(tmp_path / "gt" / f"{name}.nii.gz")
        assert np.array_equal(pred_back, pred) and np.array_equal(gt_back, gt)
        spacing = sitk.ReadImage(ref).GetSpacing()[::-1]
        assert spacing == pytest.approx(spacing_zyx) and geom.spacing_zyx == pytest.approx(spacing_zyx)
        recomputed = case_metrics(pred_back, gt_back, spacing=spacing, classes=CLASSES, tolerance_mm=1.5)
        for cls, row in recomputed.items():
            for metric, value in row.items():
                got = reported["per_case"][name][cls][metric]
                if math.isfinite(value):
                    assert got == pytest.approx(value, rel=1e-6), (name, cls, metric)
                else:
                    assert got is None and result["per_case"][name][cls][metric] == math.inf
    assert reported["per_case"]["case_b"]["kidney"]["dice"] == 0.0
    liver = [reported["per_case"][c]["liver"]["dice"] for c in ("case_a", "case_b")]
    assert reported["summary"]["per_class"]["liver"]["dice"]["mean"] == pytest.approx(np.mean(liver))
    assert reported["summary"]["per_class"]["kidney"]["hd95"]["n_inf"] == 1
    assert reported["config"]["spacing"]["case_b"] == pytest.approx([2.0, 0.6, 1.2])
    assert reported["per_slice_summary"]["per_class"]["liver"]["dice"]["n"] > 2

    # the in-memory path with explicit spacing gives the same numbers
    arrays = evaluate_predictions(
        {n: c[0] for n, c in nifti_cases.items()},
        {n: c[1] for n, c in nifti_cases.items()},
        classes=CLASSES,
        spacing={n: c[2] for n, c in nifti_cases.items()},
        tolerance_mm=1.5,
        print_table=False,
    )
    assert arrays["per_case"] == result["per_case"]


def test_evaluate_errors_and_default_classes(tmp_path, nifti_cases):
    ref_other = make_reference(tmp_path / "other.nii.gz", shape_zyx=(8, 12, 14), spacing=(1.0, 1.0, 1.0))
    bad = tmp_path / "bad_pred"
    save_label_volume(nifti_cases["case_a"][0], ref_other, bad / "case_a.nii.gz")
    save_label_volume(nifti_cases["case_b"][0], nifti_cases["case_b"][3], bad / "case_b.nii.gz")
    with pytest.raises(ValueError, match="case_a.nii.gz has geometry"):
        evaluate_predictions(bad, tmp_path / "gt", print_table=False)
    (bad / "case_a.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="case_a"):
        evaluate_predictions(bad, tmp_path / "gt", print_table=False)
    # 2D arrays, no spacing: distances in pixels, classes found in the ground truth
    gt = {"img1": np.array([[0, 1, 1], [0, 2, 0]]), "img2": np.array([[1, 1, 0], [0, 0, 0]])}
    res = evaluate_predictions(gt, gt, print_table=False)
    assert sorted(res["per_case"]["img1"]) == ["1", "2"]
    assert res["summary"]["overall"]["dice"]["mean"] == 1.0


def test_overlays(tmp_path):
    image = torch.full((3, 40, 50), 100, dtype=torch.uint8)
    pred = torch.zeros(2, 40, 50, dtype=torch.bool)
    pred[0, 5:20, 5:20] = True
    gt = np.zeros((40, 50), np.int64)
    gt[25:35, 30:45] = 2
    out = draw_overlay(
        image,
        pred=pred,
        gt=gt,
        points=[[40, 10], [10, 35]],
        point_labels=[1, 0],
        boxes=[[2, 2, 22, 22]],
        alpha=0.5,
    )
    assert out.shape == (3, 40, 50) and out.dtype == torch.uint8
    assert not torch.equal(out[:, 12, 12], image[:, 12, 12])  # prediction filled
    assert torch.equal(out[:, 30, 37], image[:, 30, 37])  # inside gt: only its outline is drawn
    assert not torch.equal(out[:, 25, 37], image[:, 25, 37])  # gt outline
    assert out[1, 10, 40] > 200 and out[0, 10, 40] < 50  # positive click: green
    assert out[0, 35, 10] > 200 and out[1, 35, 10] < 50  # negative click: red
    assert torch.equal(out[:, 30, 2], image[:, 30, 2])  # untouched background

    vol = np.random.default_rng(0).normal(size=(5, 16, 16))
    labels = np.zeros((5, 16, 16), np.int64)
    labels[3, 2:9, 2:9], labels[1, 4:6, 4:6] = 1, 1
    assert largest_slice(labels) == 3 and largest_slice(labels, axis=2) in range(2, 9)
    rgb = to_uint8(vol[3])
    assert rgb.shape == (3, 16, 16) and rgb.dtype == torch.uint8 and int(rgb.max()) == 255
    items = [{"id": f"case/{k}", "image": rgb, "pred": labels[3], "gt": labels[3]} for k in range(4)]
    paths = save_overlays(items, tmp_path / "ov", max_cases=2)
    assert [p.name for p in paths] == ["case__0.png", "case__1.png"]
    with Image.open(paths[0]) as im:
        assert im.size == (16, 16)


def test_evaluate_writes_case_overlays(tmp_path, nifti_cases):
    images = {n: sitk.GetArrayFromImage(sitk.ReadImage(c[3])) for n, c in nifti_cases.items()}
    evaluate_predictions(
        tmp_path / "pred", tmp_path / "gt", out_dir=tmp_path / "e", images=images, num_overlays=1, print_table=False
    )
    written = sorted(p.name for p in (tmp_path / "e" / "overlays").iterdir())
    assert len(written) == 1 and written[0].startswith("case_a_slice")
