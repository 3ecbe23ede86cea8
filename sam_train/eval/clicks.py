"""Interactive evaluation: simulated clicks, IoU-vs-clicks, NoC@85/90, and SAM-Med2D box / point Dice.

Click simulation is RITM's clicker (Sofiiuk et al. 2022; the protocol of SimpleClick, FocalClick and SAM's
point evaluation): the next click goes to the error pixel farthest from the error region's boundary
(Euclidean distance transform, image borders count as boundary); false negatives and false positives
compete on that depth (a positive click only when the misses are strictly deeper), so a click goes where
a user sees a clear error, never onto a one-pixel rim along a long boundary while a thick error remains. A
false negative gives a positive click (label 1), a false positive a negative click (label 0). When the
prediction is already perfect the "click" is a padding point (label -1) at (0, 0), which SAM ignores.

Coordinates are (x, y) pixel indices in the ground-truth mask's resolution. A `predict_fn` maps
prompts to masks at that resolution:

    predict_fn(points float [M, K, 2], labels int64 [M, K], prev_low_res or None)
        -> (mask logits float [M, H, W], low-res logits to feed back as the next mask prompt)

Boxes travel as two points labelled 2 (top-left) and 3 (bottom-right), as in the model API.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from sam_train.eval.metrics import dice, iou
from sam_train.prompts.boxes import masks_to_boxes
from sam_train.prompts.points import deepest_pixel

PredictFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


def _click_one(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int, float]:
    """One [H, W] mask pair -> (x, y, label, depth) of the next simulated click."""
    fn_depth, fn_x, fn_y = deepest_pixel(gt & ~pred)
    fp_depth, fp_x, fp_y = deepest_pixel(pred & ~gt)
    if fn_depth == 0 and fp_depth == 0:
        return 0, 0, -1, 0.0
    return (fn_x, fn_y, 1, fn_depth) if fn_depth > fp_depth else (fp_x, fp_y, 0, fp_depth)


def next_click(
    pred: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray, *, return_depth: bool = False
) -> tuple[torch.Tensor, ...]:
    """Next simulated click for each mask.

    Args:
        pred: bool [H, W] or [M, H, W], the current prediction.
        gt: bool of the same shape, the ground truth.
        return_depth: also return each click's depth.
    Returns:
        coords float [M, 2] (x, y) and labels int64 [M] (1 positive, 0 negative, -1 nothing to fix);
        [2] and [] for a single [H, W] mask. With return_depth, third: float [M] (or []) the clicked
        error region's depth at the click, in pixels (1: the error is one pixel wide there; 0: no click).
    """
    p, g = np.asarray(torch.as_tensor(pred).cpu()), np.asarray(torch.as_tensor(gt).cpu())
    if p.shape != g.shape or p.ndim not in (2, 3) or p.dtype != bool or g.dtype != bool:
        raise ValueError(
            f"pred and gt must be bool masks of the same shape [H, W] or [M, H, W], got {p.dtype}{list(p.shape)} "
            f"and {g.dtype}{list(g.shape)}"
        )
    single = p.ndim == 2
    clicks = [_click_one(pi, gi) for pi, gi in zip(p[None] if single else p, g[None] if single else g, strict=True)]
    coords = torch.tensor([[x, y] for x, y, _, _ in clicks], dtype=torch.float32).reshape(-1, 2)
    labels = torch.tensor([lab for _, _, lab, _ in clicks], dtype=torch.int64)
    out = (coords, labels) + ((torch.tensor([d for *_, d in clicks], dtype=torch.float32),) if return_depth else ())
    return tuple(t[0] for t in out) if single else out


def progressive_merge(
    previous: torch.Tensor, new: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """FocalClick's progressive merge (Chen et al. 2022): a click edits the mask only where it was put.

    Keeps `previous` except for the region where `new` differs from it that is connected (8-neighbours) to the
    click; that region takes `new`'s value. A click that changes nothing at its own pixel changes nothing.
    Why: a correction click on a thin boundary error can make the model redraw the whole object; a user
    clicking there meant to fix that spot.

    Args:
        previous, new: bool [M, H, W] masks before and after the click.
        coords: [M, 2] (x, y) pixel of each object's click at that resolution.
        labels: [M] click labels; objects with -1 (no click) keep `previous`.
    Returns:
        bool [M, H, W] merged masks.
    """
    if previous.shape != new.shape or previous.ndim != 3 or coords.shape != (previous.shape[0], 2):
        raise ValueError(f"progressive_merge: masks [M, H, W] of one shape and coords [M, 2], got "
                         f"{list(previous.shape)}, {list(new.shape)}, {list(coords.shape)}")
    out = previous.clone()
    changed = (previous ^ new).cpu().numpy()
    for j, ((x, y), lab) in enumerate(zip(coords.round().long().tolist(), labels.tolist(), strict=True)):
        if lab < 0 or not changed[j, y, x]:
            continue
        regions, _ = ndimage.label(changed[j], structure=np.ones((3, 3), bool))
        region = torch.from_numpy(regions == regions[y, x]).to(out.device)
        out[j] = previous[j] ^ region
    return out


def _check_gt(gt_masks: torch.Tensor | np.ndarray) -> torch.Tensor:
    gt = torch.as_tensor(gt_masks).cpu()
    if gt.dtype != torch.bool or gt.ndim != 3:
        raise ValueError(f"gt_masks must be bool [M, H, W], got {gt.dtype}{list(gt.shape)}")
    empty = (~gt.flatten(1).any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"gt_masks {empty} are empty: interactive evaluation needs an object to click on")
    return gt


def _predict(predict_fn: PredictFn, points, labels, prev, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits, low_res = predict_fn(points, labels, prev)
    if tuple(logits.shape) != tuple(gt.shape):
        raise ValueError(f"predict_fn must return mask logits of shape {tuple(gt.shape)}, got {tuple(logits.shape)}")
    return logits.detach().cpu() > 0, low_res


def _click_loop(predict_fn: PredictFn, gt: torch.Tensor, n_clicks: int, score) -> torch.Tensor:
    """Run n_clicks simulated clicks, feeding back the low-res logits; -> score [M, n_clicks]."""
    m = gt.shape[0]
    pred = torch.zeros_like(gt)
    points = torch.zeros(m, 0, 2)
    labels = torch.zeros(m, 0, dtype=torch.int64)
    prev = None
    scores = []
    for _ in range(n_clicks):
        coords, new_labels = next_click(pred, gt)
        points = torch.cat([points, coords[:, None]], dim=1)
        labels = torch.cat([labels, new_labels[:, None]], dim=1)
        pred, prev = _predict(predict_fn, points, labels, prev, gt)
        scores.append(score(pred, gt))
    return torch.stack(scores, dim=1)


def number_of_clicks(iou_per_click: torch.Tensor, threshold: float) -> torch.Tensor:
    """NoC per object: the first click count (1-based) whose IoU reaches threshold; the total number
    of clicks when it never does. iou_per_click: [M, K] -> int64 [M]."""
    reached = iou_per_click >= threshold
    first = reached.int().argmax(dim=1) + 1
    return torch.where(reached.any(dim=1), first, torch.full_like(first, iou_per_click.shape[1]))


def click_protocol(
    predict_fn: PredictFn,
    gt_masks: torch.Tensor | np.ndarray,
    *,
    max_clicks: int = 20,
    iou_thresholds: Sequence[float] = (0.85, 0.9),
) -> dict:
    """Interactive protocol: up to `max_clicks` simulated clicks per object.

    Args:
        predict_fn: see the module docstring.
        gt_masks: bool [M, H, W], one non-empty object per row.
    Returns:
        {"iou_per_click": float [M, max_clicks], "mean_iou_curve": list of max_clicks floats,
         "noc_per_object": {"noc85": int64 [M], ...}, "noc85": float mean, "noc90": float mean, ...}
    """
    gt = _check_gt(gt_masks)
    ious = _click_loop(predict_fn, gt, max_clicks, iou)
    out: dict = {"iou_per_click": ious, "mean_iou_curve": ious.mean(dim=0).tolist(), "noc_per_object": {}}
    for thr in iou_thresholds:
        key = f"noc{round(thr * 100)}"
        out["noc_per_object"][key] = number_of_clicks(ious, thr)
        out[key] = float(out["noc_per_object"][key].float().mean())
    return out


def sam_med2d_protocol(
    predict_fn: PredictFn, gt_masks: torch.Tensor | np.ndarray, *, point_counts: Sequence[int] = (1, 3, 5)
) -> dict:
    """Dice with a tight box prompt and with 1 / 3 / 5 points, as SAM-Med2D reports them.

    The first point is the positive click at the object's most interior point (what `next_click`
    gives for an empty prediction); later points are simulated error-region clicks with the previous
    low-res logits fed back. The box is the mask's tight bounding box (no jitter).

    Returns:
        {"dice": {"box": float, "1_point": float, "3_points": float, ...},
         "dice_per_object": {same keys: float [M]}}
    """
    gt = _check_gt(gt_masks)
    boxes = masks_to_boxes(gt)  # [M, 4] x0 y0 x1 y1, inclusive pixel indices
    box_labels = torch.tensor([[2, 3]], dtype=torch.int64).expand(gt.shape[0], 2)
    pred_box, _ = _predict(predict_fn, boxes.view(-1, 2, 2), box_labels, None, gt)
    per_object = {"box": dice(pred_box, gt)}
    if point_counts:
        scores = _click_loop(predict_fn, gt, max(point_counts), dice)
        for n in point_counts:
            per_object[f"{n}_point" + ("s" if n > 1 else "")] = scores[:, n - 1]
    return {"dice": {k: float(v.mean()) for k, v in per_object.items()}, "dice_per_object": per_object}


def plot_iou_curve(curves: Mapping[str, Sequence[float]], path: str | Path, *, title: str = "IoU vs clicks") -> Path:
    """Plot mean IoU after 1..K clicks for each named curve to a PNG (Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), list(curve), marker="o", markersize=3, label=name)
    ax.set_xlabel("number of clicks")
    ax.set_ylabel("mean IoU")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    if curves:
        ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
