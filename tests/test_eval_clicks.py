"""Click simulator and interactive protocols, checked against brute-force references and toy predictors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from scipy.spatial.distance import cdist

from sam_train.eval.clicks import (
    click_protocol,
    next_click,
    number_of_clicks,
    plot_iou_curve,
    progressive_merge,
    sam_med2d_protocol,
)


def _blob(rng: np.random.Generator, shape, q=0.7) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    return field > np.quantile(field, q)


def _interior_distance(region: np.ndarray) -> np.ndarray:
    """Brute force: distance of each region pixel to the nearest non-region pixel, with a
    background ring around the image (the border counts as boundary)."""
    padded = np.pad(region, 1)
    inside, outside = np.argwhere(padded), np.argwhere(~padded)
    dist = np.zeros(padded.shape)
    dist[tuple(inside.T)] = cdist(inside, outside).min(axis=1)
    return dist[1:-1, 1:-1]


def test_click_at_the_deepest_error_pixel():
    """RITM's clicker: the error pixel farthest from the error boundary; misses and false positives compete
    on that depth (positive only when the misses are strictly deeper)."""
    rng = np.random.default_rng(0)
    for _ in range(25):
        pred, gt = _blob(rng, (24, 28)), _blob(rng, (24, 28))
        coords, label = next_click(torch.from_numpy(pred), torch.from_numpy(gt))
        x, y = int(coords[0]), int(coords[1])
        assert coords.shape == (2,) and label.shape == ()
        assert pred[y, x] != gt[y, x], "click must lie in the error region"
        assert int(label) == int(gt[y, x]), "positive on missed foreground, negative on false positive"
        depth = {1: _interior_distance(gt & ~pred), 0: _interior_distance(pred & ~gt)}
        assert int(label) == int(depth[1].max() > depth[0].max())
        *_, clicked_depth = next_click(torch.from_numpy(pred), torch.from_numpy(gt), return_depth=True)
        assert float(clicked_depth) == pytest.approx(depth[int(label)].max())
        assert depth[int(label)][y, x] == pytest.approx(depth[int(label)].max())
        first = np.argwhere(np.isclose(depth[int(label)], depth[int(label)].max()))[0]  # row-major tie rule
        assert (y, x) == tuple(first)


def test_batched_clicks_and_perfect_prediction():
    rng = np.random.default_rng(1)
    gt = np.stack([_blob(rng, (20, 20)) for _ in range(4)])
    pred = np.stack([_blob(rng, (20, 20)) for _ in range(4)])
    pred[2] = gt[2]  # nothing to fix for object 2
    coords, labels = next_click(torch.from_numpy(pred), torch.from_numpy(gt))
    assert coords.shape == (4, 2) and labels.shape == (4,) and labels.dtype == torch.int64
    for k in range(4):
        c, lab = next_click(pred[k], gt[k])
        assert torch.equal(coords[k], c) and labels[k] == lab
    assert labels[2] == -1  # padding point: the model ignores it
    _, _, depths = next_click(torch.from_numpy(pred), torch.from_numpy(gt), return_depth=True)
    assert depths.shape == (4,) and depths[2] == 0 and (depths[[0, 1, 3]] >= 1).all()
    # empty prediction: the first click is positive, in the object's most interior pixel
    c, lab = next_click(np.zeros((20, 20), bool), gt[0])
    assert lab == 1 and gt[0][int(c[1]), int(c[0])]
    with pytest.raises(ValueError, match="bool masks"):
        next_click(pred.astype(np.uint8), gt)


def test_progressive_merge_edits_only_the_region_of_the_click():
    previous = torch.zeros(3, 20, 20, dtype=torch.bool)
    previous[:, 4:12, 4:12] = True
    new = previous.clone()
    new[:, 4, 4:12] = False  # the click's edit: the top row of the square removed
    new[:, 16:19, 16:19] = True  # a redraw far from the click
    coords = torch.tensor([[7.0, 4.0], [7.0, 4.0], [0.0, 0.0]])
    merged = progressive_merge(previous, new, coords, torch.tensor([0, -1, 0]))
    expected = previous[0].clone()
    expected[4, 4:12] = False
    assert torch.equal(merged[0], expected)  # the row went, the far blob did not come
    assert torch.equal(merged[1], previous[1])  # no click (label -1): nothing changes
    assert torch.equal(merged[2], previous[2])  # the click's own pixel did not change: nothing changes
    # 8-connected: a diagonal step still belongs to the click's region
    new2 = previous.clone()
    new2[:, 12, 12] = True
    new2[:, 13, 13] = True
    assert torch.equal(progressive_merge(previous, new2, torch.tensor([[13.0, 13.0]] * 3), torch.ones(3).long()), new2)
    with pytest.raises(ValueError, match="coords"):
        progressive_merge(previous, new, coords[:2], torch.tensor([0, 0]))


def test_perfect_predictor_needs_one_click():
    rng = np.random.default_rng(2)
    gt = torch.from_numpy(np.stack([_blob(rng, (32, 32)) for _ in range(3)]))
    calls = []

    def oracle(points, labels, prev):
        calls.append(points.shape)
        return gt.float() * 20 - 10, torch.zeros(3, 1, 8, 8)

    out = click_protocol(oracle, gt, max_clicks=5)
    assert out["noc85"] == 1.0 and out["noc90"] == 1.0
    assert torch.equal(out["noc_per_object"]["noc90"], torch.ones(3, dtype=torch.int64))
    assert torch.allclose(out["iou_per_click"], torch.ones(3, 5))
    assert out["mean_iou_curve"] == [1.0] * 5
    assert calls == [(3, k, 2) for k in range(1, 6)]


def test_protocol_counts_clicks_and_feeds_back_logits():
    """Two separate blobs (48 and 16 pixels). A component oracle fills the gt components that contain
    a positive click: click 1 finds the big blob (IoU 0.75), click 2 the small one (IoU 1)."""
    gt = np.zeros((1, 24, 24), bool)
    gt[0, 2:8, 2:10] = True  # 48 px
    gt[0, 14:18, 14:18] = True  # 16 px
    comps, _ = ndimage.label(gt[0])
    seen_prev = []

    def component_oracle(points, labels, prev):
        seen_prev.append(None if prev is None else prev.clone())
        mask = np.zeros((24, 24), bool)
        for (x, y), lab in zip(points[0].long().tolist(), labels[0].tolist(), strict=True):
            if lab == 1 and comps[y, x]:
                mask |= comps == comps[y, x]
        logits = torch.from_numpy(mask).float()[None] * 2 - 1
        return logits, torch.full((1, 1, 6, 6), float(len(seen_prev)))

    out = click_protocol(component_oracle, gt, max_clicks=4, iou_thresholds=(0.7, 0.85, 0.9))
    assert out["iou_per_click"][0].tolist() == pytest.approx([0.75, 1.0, 1.0, 1.0])
    assert out["noc70"] == 1.0 and out["noc85"] == 2.0 and out["noc90"] == 2.0
    assert seen_prev[0] is None and all(float(p[0, 0, 0, 0]) == k + 1 for k, p in enumerate(seen_prev[1:]))

    never = click_protocol(lambda p, lab, prev: (torch.full((1, 24, 24), -1.0), None), gt, max_clicks=3)
    assert never["noc85"] == 3.0 and never["iou_per_click"].sum() == 0
    assert number_of_clicks(torch.tensor([[0.2, 0.86, 0.95], [0.1, 0.2, 0.3]]), 0.85).tolist() == [2, 3]
    with pytest.raises(ValueError, match="empty"):
        click_protocol(component_oracle, np.zeros((1, 24, 24), bool))


def test_sam_med2d_protocol_box_and_points():
    gt = torch.zeros(2, 20, 20, dtype=torch.bool)
    gt[0, 3:9, 4:12] = True
    gt[0, 3:5, 4:6] = False  # box covers more than the object
    gt[1, 10:17, 2:6] = True

    def fake(points, labels, prev):
        out = torch.full((2, 20, 20), -1.0)
        if labels.shape[1] == 2 and (labels == torch.tensor([2, 3])).all():
            # box prompt: predict the box region; the box must be the tight inclusive bbox
            assert points[0].tolist() == [[4.0, 3.0], [11.0, 8.0]]
            for i, ((x0, y0), (x1, y1)) in enumerate(points.long().tolist()):
                out[i, y0 : y1 + 1, x0 : x1 + 1] = 1
        else:
            k = labels.shape[1]  # more clicks, more of the object: rows of gt up to k * 2
            out[gt] = 1
            out[:, 2 * k + 10 :, :] = -1
        return out, torch.zeros(2, 1, 5, 5)

    res = sam_med2d_protocol(fake, gt)
    box = gt.clone()
    box[0, 3:9, 4:12] = True
    ref_box = [2 * (b & g).sum() / (b.sum() + g.sum()) for b, g in zip(box, gt, strict=True)]
    assert res["dice_per_object"]["box"].tolist() == pytest.approx([float(v) for v in ref_box])
    assert set(res["dice"]) == {"box", "1_point", "3_points", "5_points"}

    def ref_points(k):
        p = gt.clone()
        p[:, 2 * k + 10 :, :] = False
        return [float(2 * (a & b).sum() / (a.sum() + b.sum())) for a, b in zip(p, gt, strict=True)]

    for k, key in [(1, "1_point"), (3, "3_points"), (5, "5_points")]:
        assert res["dice_per_object"][key].tolist() == pytest.approx(ref_points(k))
        assert res["dice"][key] == pytest.approx(np.mean(ref_points(k)))


def test_plot_iou_curve(tmp_path):
    path = plot_iou_curve({"sam": [0.5, 0.7, 0.8], "ours": [0.6, 0.85, 0.9]}, tmp_path / "sub" / "curve.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (500, 350)
        colours = np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)
    assert len(colours) > 10  # something was drawn


@torch.no_grad()
def test_protocols_drive_the_real_model(tiny_sam):
    """The predict_fn contract fits Sam.decode: clicks, padding points, boxes as labels 2/3 and
    fed-back low-res logits (random weights, so only the plumbing is checked)."""
    tiny_sam.eval()
    size = tiny_sam.image_encoder.img_size
    gt = torch.zeros(2, size, size, dtype=torch.bool)
    gt[0, 40:120, 50:150] = True
    gt[1, 150:230, 20:90] = True
    image = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    embeddings = tiny_sam.encode(tiny_sam.preprocess(image.float()))
    labels_seen = []

    def predict_fn(points, labels, prev):
        labels_seen.append(labels.clone())
        low_res, _ = tiny_sam.decode(embeddings, torch.zeros(2, dtype=torch.int64), points, labels, prev)
        low_res = low_res[:, :1]  # single-mask token
        return tiny_sam.postprocess_masks(low_res, (size, size), (size, size))[:, 0], low_res

    out = click_protocol(predict_fn, gt, max_clicks=3)
    assert out["iou_per_click"].shape == (2, 3) and ((out["iou_per_click"] >= 0) & (out["iou_per_click"] <= 1)).all()
    assert 1 <= out["noc85"] <= 3 and labels_seen[0][:, 0].tolist() == [1, 1]
    med = sam_med2d_protocol(predict_fn, gt, point_counts=(1, 2))
    assert set(med["dice"]) == {"box", "1_point", "2_points"}
    assert labels_seen[3].tolist() == [[2, 3], [2, 3]]
