"""Metrics against independent numpy / scipy brute-force references, incl. anisotropic spacing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist

from sam_train.eval.metrics import case_metrics, dice, hd95, iou, normalized_surface_dice, slice_metrics, summarize
from sam_train.eval.report import format_table, write_metrics_json


def _blob(rng: np.random.Generator, shape: tuple[int, ...], smooth: float = 1.5) -> np.ndarray:
    """A random smooth blob (may touch the array border)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), smooth)
    return field > np.quantile(field, 0.7)


def _np_dice(p: np.ndarray, g: np.ndarray) -> float:
    return 2 * (p & g).sum() / (p.sum() + g.sum())


def _np_iou(p: np.ndarray, g: np.ndarray) -> float:
    return (p & g).sum() / (p | g).sum()


def _surface_distances(p: np.ndarray, g: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: surface = voxels removed by one erosion (outside the array is background);
    all pairwise physical distances between surface voxels."""
    sp, sg = p & ~ndimage.binary_erosion(p), g & ~ndimage.binary_erosion(g)
    cp, cg = np.argwhere(sp) * np.asarray(spacing), np.argwhere(sg) * np.asarray(spacing)
    d = cdist(cp, cg)
    return d.min(axis=1), d.min(axis=0)  # pred -> gt, gt -> pred


def _ref_hd95(p, g, spacing) -> float:
    a, b = _surface_distances(p, g, spacing)
    return max(np.percentile(a, 95), np.percentile(b, 95))


def _ref_nsd(p, g, spacing, tol) -> float:
    a, b = _surface_distances(p, g, spacing)
    return ((a <= tol).sum() + (b <= tol).sum()) / (len(a) + len(b))


def test_dice_iou_match_numpy_2d_and_3d():
    rng = np.random.default_rng(0)
    for shape in [(4, 24, 20), (3, 8, 12, 10)]:
        p = np.stack([_blob(rng, shape[1:]) for _ in range(shape[0])])
        g = np.stack([_blob(rng, shape[1:]) for _ in range(shape[0])])
        got_d, got_i = dice(p, g), iou(torch.from_numpy(p), torch.from_numpy(g))
        assert got_d.shape == got_i.shape == (shape[0],)
        for k in range(shape[0]):
            assert got_d[k].item() == pytest.approx(_np_dice(p[k], g[k]), abs=1e-6)
            assert got_i[k].item() == pytest.approx(_np_iou(p[k], g[k]), abs=1e-6)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.8, 1.25), (0.6, 2.0, 0.9)])
def test_nsd_hd95_match_brute_force_3d(spacing):
    rng = np.random.default_rng(1)
    shape = (10, 14, 12)
    for _ in range(2):
        p, g = _blob(rng, shape), _blob(rng, shape)
        assert hd95(p, g, spacing) == pytest.approx(_ref_hd95(p, g, spacing), rel=1e-5, abs=1e-5)
        for tol in (0.5, 1.0, 2.5):
            assert normalized_surface_dice(p, g, spacing, tol) == pytest.approx(_ref_nsd(p, g, spacing, tol), abs=1e-6)


def test_nsd_hd95_match_brute_force_2d_anisotropic():
    rng = np.random.default_rng(2)
    p, g = _blob(rng, (30, 26), 2.0), _blob(rng, (30, 26), 2.0)
    spacing = (0.5, 2.0)
    assert hd95(p, g, spacing) == pytest.approx(_ref_hd95(p, g, spacing), rel=1e-5)
    assert normalized_surface_dice(p, g, spacing, 1.0) == pytest.approx(_ref_nsd(p, g, spacing, 1.0), abs=1e-6)
    # no spacing = 1 pixel per axis
    assert hd95(p, g) == pytest.approx(_ref_hd95(p, g, (1, 1)), rel=1e-5)


def test_known_distance_follows_array_axis_order():
    """Two single voxels 1 apart in z and 3 apart in x: distance sqrt((1*3)^2 + (3*0.5)^2)."""
    p, g = np.zeros((6, 8, 8), bool), np.zeros((6, 8, 8), bool)
    p[1, 4, 2], g[2, 4, 5] = True, True
    spacing = (3.0, 1.0, 0.5)
    expected = math.sqrt(9.0 + 2.25)
    assert hd95(p, g, spacing) == pytest.approx(expected, rel=1e-5)
    assert normalized_surface_dice(p, g, spacing, tolerance_mm=expected - 0.01) == 0.0
    assert normalized_surface_dice(p, g, spacing, tolerance_mm=expected + 0.01) == 1.0
    # spacing applies per array axis (z, y, x), not x-y-z: reversing it changes the distance
    assert hd95(p, g, spacing[::-1]) == pytest.approx(math.sqrt(0.25 + 81.0), rel=1e-5)


def test_empty_conventions():
    empty, full = np.zeros((5, 6, 7), bool), np.zeros((5, 6, 7), bool)
    full[1:3, 2:4, 2:5] = True
    sp = (2.0, 1.0, 1.0)
    both = (dice(empty[None], empty[None])[0], iou(empty[None], empty[None])[0])
    assert [float(v) for v in both] == [1.0, 1.0]
    assert normalized_surface_dice(empty, empty, sp) == 1.0 and hd95(empty, empty, sp) == 0.0
    for p, g in [(empty, full), (full, empty)]:
        assert dice(p[None], g[None])[0] == 0.0 and iou(p[None], g[None])[0] == 0.0
        assert normalized_surface_dice(p, g, sp) == 0.0
        assert hd95(p, g, sp) == math.inf


def test_case_metrics_per_class_and_errors():
    rng = np.random.default_rng(3)
    shape = (8, 12, 12)
    gt = _blob(rng, shape).astype(np.int64) + 0
    gt[_blob(rng, shape) & (gt == 0)] = 2
    pred = _blob(rng, shape).astype(np.int16)
    spacing = (2.5, 0.7, 0.7)
    out = case_metrics(pred, gt, spacing=spacing, classes={1: "liver", 2: "spleen", 3: "absent"}, tolerance_mm=1.0)
    assert set(out) == {"liver", "spleen", "absent"}
    p1, g1 = pred == 1, gt == 1
    assert out["liver"]["dice"] == pytest.approx(_np_dice(p1, g1), abs=1e-6)
    assert out["liver"]["iou"] == pytest.approx(_np_iou(p1, g1), abs=1e-6)
    assert out["liver"]["hd95"] == pytest.approx(_ref_hd95(p1, g1, spacing), rel=1e-5)
    assert out["liver"]["nsd"] == pytest.approx(_ref_nsd(p1, g1, spacing, 1.0), abs=1e-6)
    assert out["spleen"] == {"dice": 0.0, "iou": 0.0, "nsd": 0.0, "hd95": math.inf}  # missed class
    assert out["absent"] == {"dice": 1.0, "iou": 1.0, "nsd": 1.0, "hd95": 0.0}  # correctly absent
    assert set(case_metrics(pred, gt, spacing=spacing, classes=[1], metrics=("dice",))["1"]) == {"dice"}
    with pytest.raises(ValueError, match="same shape"):
        case_metrics(pred[:-1], gt, spacing=spacing, classes=[1])
    with pytest.raises(ValueError, match="3 positive numbers"):
        case_metrics(pred, gt, spacing=(1.0, 1.0), classes=[1])
    with pytest.raises(ValueError, match="integer"):
        case_metrics(pred.astype(float), gt, spacing=spacing, classes=[1])


def test_slice_metrics_use_in_plane_spacing():
    rng = np.random.default_rng(4)
    gt = np.zeros((4, 16, 16), np.int64)
    pred = np.zeros_like(gt)
    gt[1], pred[1] = _blob(rng, (16, 16)), _blob(rng, (16, 16))
    gt[2] = _blob(rng, (16, 16))
    out = slice_metrics(pred, gt, spacing=(5.0, 0.5, 1.5), classes=[1], axis=0)
    assert sorted(out) == [1, 2]  # slices with no foreground anywhere are skipped
    p, g = pred[1] == 1, gt[1] == 1
    assert out[1]["1"]["hd95"] == pytest.approx(_ref_hd95(p, g, (0.5, 1.5)), rel=1e-5)
    assert out[1]["1"]["dice"] == pytest.approx(_np_dice(p, g), abs=1e-6)
    assert out[2]["1"]["dice"] == 0.0 and out[2]["1"]["hd95"] == math.inf


def test_summarize_and_report(tmp_path):
    per_case = {
        "a": {"x": {"dice": 0.9, "hd95": 2.0}, "y": {"dice": 0.5, "hd95": math.inf}},
        "b": {"x": {"dice": 0.7, "hd95": 4.0}, "y": {"dice": 0.3, "hd95": 1.0}},
        "c": {"x": {"dice": 0.8, "hd95": 3.0}, "y": {"dice": 1.0, "hd95": 0.0}},
    }
    s = summarize(per_case)
    assert s["per_class"]["x"]["dice"]["mean"] == pytest.approx(0.8)
    assert s["per_class"]["x"]["dice"]["std"] == pytest.approx(np.std([0.9, 0.7, 0.8]))
    assert s["per_class"]["y"]["hd95"] == pytest.approx({"mean": 0.5, "std": 0.5, "n": 2, "n_inf": 1})
    case_means = [np.mean([0.9, 0.5]), np.mean([0.7, 0.3]), np.mean([0.8, 1.0])]
    assert s["overall"]["dice"]["mean"] == pytest.approx(np.mean(case_means))
    assert s["overall"]["dice"]["std"] == pytest.approx(np.std(case_means))
    assert s["overall"]["hd95"]["mean"] == pytest.approx(np.mean([2.0, 2.5, 1.5]))  # case a: finite classes only

    path = write_metrics_json({"per_case": per_case, "summary": s, "nan": float("nan")}, tmp_path / "m.json")

    def reject(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    data = json.loads(path.read_text(), parse_constant=reject)
    assert data["per_case"]["a"]["y"]["hd95"] is None and data["nan"] is None
    assert data["per_case"]["b"]["y"]["hd95"] == 1.0

    table = format_table(s)
    lines = table.splitlines()
    assert lines[0].split() == ["class", "Dice", "HD95"]
    assert any(line.startswith("x") and "0.8000 ± 0.0816" in line for line in lines)
    assert any(line.startswith("y") and "(1 inf)" in line for line in lines)
    assert any(line.startswith("mean") for line in lines) and "3 cases" in lines[-1]
