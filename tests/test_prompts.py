"""Point and box samplers: support, labels, uniformity, noise bounds, schedule, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_train.prompts import (
    PromptSimulationConfig,
    center_points,
    error_regions,
    expand_boxes_uniform,
    iteration_schedule,
    jitter_boxes,
    masks_to_boxes,
    sample_error_points,
    sample_points,
)


def random_masks(m: int, h: int, w: int, seed: int, p: float = 0.3) -> torch.Tensor:
    return torch.rand(m, h, w, generator=torch.Generator().manual_seed(seed)) < p


def at(masks: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Value of each mask [M, H, W] at its (x, y) point [M, 2]."""
    x, y = coords[:, 0].long(), coords[:, 1].long()
    return masks[torch.arange(masks.shape[0]), y, x]


def test_sample_points_lie_inside_and_flag_empty_masks(gen):
    masks = random_masks(64, 13, 17, seed=0, p=0.05)
    masks[3] = False
    coords, valid = sample_points(masks, gen)
    assert coords.shape == (64, 2) and coords.dtype == torch.float32
    assert valid.tolist() == masks.flatten(1).any(1).tolist()
    assert at(masks, coords)[valid].all()
    assert coords[3].tolist() == [0.0, 0.0]


def test_sample_points_are_uniform_over_the_mask(gen):
    mask = torch.zeros(7, 9, dtype=torch.bool)
    pixels = [(0, 0), (2, 8), (3, 3), (3, 4), (6, 1)]  # (y, x), spread over rows and columns
    for y, x in pixels:
        mask[y, x] = True
    n = 20000
    coords, _ = sample_points(mask.expand(n, 7, 9), gen)
    counts = {(y, x): 0 for y, x in pixels}
    for x, y in coords.long().tolist():
        counts[(y, x)] += 1
    expected = n / len(pixels)
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 18.5  # chi-square, 4 degrees of freedom, p = 0.001


def test_error_points_inside_error_region_with_correct_label(gen):
    gt = random_masks(200, 12, 12, seed=1, p=0.4)
    pred = random_masks(200, 12, 12, seed=2, p=0.4)
    pred[:50] = gt[:50] | random_masks(50, 12, 12, seed=3, p=0.05)  # mostly false positives
    pred[50:100] = gt[50:100] & random_masks(50, 12, 12, seed=4, p=0.9)  # mostly false negatives
    coords, labels = sample_error_points(pred, gt, gen)
    fn, fp = gt & ~pred, pred & ~gt
    n_fn, n_fp = fn.flatten(1).sum(1), fp.flatten(1).sum(1)
    assert torch.equal(labels == 1, n_fn >= n_fp)  # the larger side wins, ties go positive
    has_error = (n_fn + n_fp) > 0
    assert at(fn, coords)[(labels == 1) & has_error].all()
    assert at(fp, coords)[labels == 0].all()
    assert at(gt, coords)[~has_error].all()  # perfect prediction: a confirming click inside gt
    assert 0 < (~has_error).sum() < 10
    assert (labels[:50][has_error[:50]] == 0).all() and (labels[50:100] == 1).all()


def test_inner_error_points_follow_ritm(gen):
    """click_region="inner": the side with the deeper error pixel (positive only when strictly deeper), and
    only its pixels deeper than half that depth (brute-force distances to the nearest non-error pixel,
    the image border counting as boundary)."""
    from scipy.spatial.distance import cdist

    def depth(region: np.ndarray) -> np.ndarray:
        padded = np.pad(region, 1)
        inside, outside = np.argwhere(padded), np.argwhere(~padded)
        out = np.zeros(padded.shape)
        if len(inside):
            out[tuple(inside.T)] = cdist(inside, outside).min(axis=1)
        return out[1:-1, 1:-1]

    gt = random_masks(40, 14, 16, seed=5, p=0.5)
    pred = random_masks(40, 14, 16, seed=6, p=0.5)
    pred[0] = gt[0]  # no error
    coords, labels = sample_error_points(pred, gt, gen, "inner")
    for i in range(1, 40):
        d = {1: depth((gt[i] & ~pred[i]).numpy()), 0: depth((pred[i] & ~gt[i]).numpy())}
        side = int(d[1].max() > d[0].max())
        assert int(labels[i]) == side
        x, y = int(coords[i, 0]), int(coords[i, 1])
        assert d[side][y, x] > d[side].max() / 2
    assert int(labels[0]) == 1 and gt[0][int(coords[0, 1]), int(coords[0, 0])]
    with pytest.raises(ValueError, match="click_region"):
        PromptSimulationConfig(click_region="center")


def test_error_points_without_error():
    gt = torch.zeros(2, 5, 5, dtype=torch.bool)
    gt[0, 1:3, 2:4] = True
    region, labels = error_regions(gt.clone(), gt)
    assert labels.tolist() == [1, -1]  # perfect mask: positive click in gt; empty gt: padding
    assert torch.equal(region, gt)


def test_center_points_are_the_evaluation_protocols_first_click():
    """The one centre click: what eval.clicks gives as the first click on an empty prediction (the SAM /
    RITM protocol: the mask's deepest pixel)."""
    from scipy import ndimage

    from sam_train.eval.clicks import next_click

    masks = random_masks(12, 24, 31, seed=3, p=0.5)
    masks = torch.from_numpy(np.stack([ndimage.binary_opening(m, iterations=2) for m in masks.numpy()]))
    masks[2] = False
    masks[5, :, :] = False
    masks[5, 3:9, 4:8] = True  # a 4-connected blob and a larger disjoint one
    masks[5, 12:22, 10:25] = True
    coords, valid = center_points(masks)
    expected, labels = next_click(torch.zeros_like(masks), masks)
    assert torch.equal(coords, expected) and valid.tolist() == (labels == 1).tolist()
    assert valid.tolist() == masks.flatten(1).any(1).tolist() and coords[2].tolist() == [0.0, 0.0]
    assert at(masks, coords)[valid].all() and 10 <= coords[5, 0] <= 24 and 12 <= coords[5, 1] <= 21
    x, y = coords[5].long().tolist()  # the deepest pixel of a 15 x 10 rectangle is 5 px from its border
    assert min(x - 10, 24 - x, y - 12, 21 - y) == 4


def test_masks_to_boxes_equals_numpy_extent():
    masks = random_masks(20, 30, 40, seed=5, p=0.002)
    masks[0] = False
    boxes = masks_to_boxes(masks)
    assert masks_to_boxes(masks[:0]).shape == (0, 4)
    for m, box in zip(masks.numpy(), boxes.tolist(), strict=True):
        ys, xs = np.nonzero(m)
        expected = [0, 0, 0, 0] if len(xs) == 0 else [xs.min(), ys.min(), xs.max(), ys.max()]
        assert box == [float(v) for v in expected]


def test_box_noise_is_bounded_and_has_the_paper_std():
    g = torch.Generator().manual_seed(0)
    n = 20000
    small = torch.tensor([100.0, 100.0, 150.0, 130.0]).expand(n, 4)  # sides 50, 30: std 5, 3 px
    noisy = jitter_boxes(small, g)
    delta = noisy - small
    assert delta.abs().max() <= 20.0
    std = delta.std(dim=0)
    assert torch.allclose(std, torch.tensor([5.0, 3.0, 5.0, 3.0]), rtol=0.05)
    big = torch.tensor([10.0, 10.0, 910.0, 610.0]).expand(n, 4)  # std 90, 60 px: the 20 px cap binds
    delta = jitter_boxes(big, g) - big
    assert delta.abs().max() == 20.0
    assert (delta.abs() == 20.0).float().mean() > 0.5


def test_box_noise_keeps_corners_ordered_and_inside_the_image():
    g = torch.Generator().manual_seed(1)
    boxes = torch.tensor([[0.0, 0.0, 3.0, 2.0], [250.0, 250.0, 255.0, 255.0], [40.0, 60.0, 41.0, 61.0]])
    boxes = boxes.repeat(1000, 1)
    out = jitter_boxes(boxes, g, noise_std=2.0, image_size=(256, 256))
    assert (out[:, 0] <= out[:, 2]).all() and (out[:, 1] <= out[:, 3]).all()
    assert out.min() >= 0 and out.max() <= 255
    assert (out - boxes).abs().max() <= 20.0  # still within the cap after re-ordering and clipping
    per_object = jitter_boxes(boxes[:2], g, image_size=torch.tensor([[100, 200], [256, 256]]))
    assert per_object[0, 2] <= 199 and per_object[0, 3] <= 99


def test_uniform_expansion_medsam():
    g = torch.Generator().manual_seed(2)
    boxes = torch.tensor([[50.0, 60.0, 80.0, 90.0]]).expand(5000, 4)
    out = expand_boxes_uniform(boxes, g, max_shift=20)
    shift = (out - boxes) * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    assert shift.min() == 0 and shift.max() == 20
    assert torch.equal(shift, shift.round())
    assert set(shift.long().flatten().tolist()) == set(range(21))
    clipped = expand_boxes_uniform(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), g, image_size=(11, 11))
    assert clipped.tolist() == [[0.0, 0.0, 10.0, 10.0]]


def test_paper_schedule():
    cfg = PromptSimulationConfig()
    positions = set()
    for seed in range(200):
        s = iteration_schedule(cfg, torch.Generator().manual_seed(seed))
        assert len(s) == 11 and s[0] and not s[-1]
        assert sum(s) == 9  # the first prompt + 8 error-sampled clicks
        (random_pos,) = [i for i, new in enumerate(s[:-1]) if not new]
        positions.add(random_pos)
    assert positions == set(range(1, 10))  # anywhere among the clicks, never the first prompt
    assert (
        iteration_schedule(PromptSimulationConfig(num_iterations=3, num_mask_only=0), torch.Generator()) == [True] * 3
    )


def test_config_validation():
    with pytest.raises(ValueError, match="num_mask_only"):
        PromptSimulationConfig(num_iterations=2, num_mask_only=2)
    with pytest.raises(ValueError, match="box_probability"):
        PromptSimulationConfig(box_probability=1.5)
    with pytest.raises(ValueError, match="box_jitter"):
        PromptSimulationConfig(box_jitter="wobble")


def test_same_seed_same_prompts_different_seed_different():
    gt = random_masks(32, 24, 24, seed=6, p=0.5)
    pred = random_masks(32, 24, 24, seed=7, p=0.5)
    boxes = masks_to_boxes(gt)

    def draw(seed: int):
        g = torch.Generator().manual_seed(seed)
        return (
            sample_points(gt, g)[0],
            sample_error_points(pred, gt, g)[0],
            jitter_boxes(boxes, g),
            iteration_schedule(PromptSimulationConfig(), g),
        )

    a, b, c = draw(0), draw(0), draw(1)
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3], strict=True)) and a[3] == b[3]
    assert not any(torch.equal(x, y) for x, y in zip(a[:3], c[:3], strict=True))
