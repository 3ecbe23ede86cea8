"""Segmentation metrics: Dice, IoU, normalised surface Dice (NSD) and HD95, per class and per case.

Dice comes from `torchmetrics.functional.segmentation`, IoU from `sam_train.losses.functional.mask_iou`;
NSD and HD95 from MONAI's `compute_surface_dice` / `compute_hausdorff_distance` with voxel spacing, so
distances and the NSD tolerance are in millimetres (or pixels when the spacing is 1). Surfaces are MONAI's: foreground
voxels with a background face-neighbour (or on the array border). HD95 is MONAI's: the larger of the
two directed 95th percentiles of surface-to-surface distances.

Spacing is given per array axis, in the array's axis order: z-y-x for a numpy volume read with
SimpleITK (`sam_train.eval.saving.load_label_volume` returns it in that order).

Empty-mask convention (the libraries return NaN or -1 here, so we decide explicitly):

| prediction | ground truth | Dice, IoU | NSD | HD95 |
|---|---|---|---|---|
| empty | empty | 1 | 1 | 0 |
| empty | non-empty | 0 | 0 | inf |
| non-empty | empty | 0 | 0 | inf |

A structure correctly predicted absent is a perfect answer; one that is missed or hallucinated is a
total miss, and its distance to a non-existent surface is infinite. `summarize` leaves infinite values
out of means and standard deviations and counts them (`n_inf`); `report.write_metrics_json` writes
non-finite numbers as `null` so `metrics.json` stays valid JSON.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torchmetrics.functional.segmentation import dice_score

from sam_train.losses.functional import mask_iou

METRICS = ("dice", "iou", "nsd", "hd95")


def _to_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return x.cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def _as_bool_tensor(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = _to_tensor(x)
    if t.dtype != torch.bool:
        raise ValueError(f"{name} must be a boolean mask, got dtype {t.dtype}")
    return t


def _check_pair(pred: torch.Tensor, gt: torch.Tensor) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got {tuple(pred.shape)} and {tuple(gt.shape)}")


def _check_masks(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p, g = _as_bool_tensor(pred, "pred"), _as_bool_tensor(gt, "gt")
    _check_pair(p, g)
    if p.ndim < 2:
        raise ValueError(f"expected masks of shape [N, *spatial], got {tuple(p.shape)}")
    return p, g


def dice(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Dice of each mask pair. pred, gt: bool [N, *spatial] (2D or 3D masks) -> float [N].

    Add a leading axis for a single mask. Both empty -> 1 (module convention).
    """
    p, g = _check_masks(pred, gt)
    # one-hot input with a single foreground channel: [N, 1, *spatial]
    p1, g1 = p[:, None].long(), g[:, None].long()
    value = dice_score(p1, g1, num_classes=1, include_background=True, average="none", input_format="one-hot")
    value = value[:, 0].float()
    both_empty = ~(p.flatten(1).any(1) | g.flatten(1).any(1))
    return torch.where(both_empty, torch.ones_like(value), value)


def iou(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> torch.Tensor:
    """IoU (Jaccard) of each mask pair. pred, gt: bool [N, *spatial] (2D or 3D masks) -> float [N]. Both empty -> 1.

    `sam_train.losses.functional.mask_iou` over each pair's flattened masks, after this module's checks.
    """
    p, g = _check_masks(pred, gt)
    return mask_iou(p.reshape(len(p), 1, -1), g.reshape(len(g), 1, -1))


def _spacing(spacing: Sequence[float] | float | None, ndim: int) -> list[float]:
    if spacing is None:
        return [1.0] * ndim
    if isinstance(spacing, (int, float)):
        return [float(spacing)] * ndim
    s = [float(v) for v in spacing]
    if len(s) != ndim or any(v <= 0 for v in s):
        raise ValueError(f"spacing must be {ndim} positive numbers (one per array axis), got {tuple(spacing)}")
    return s


def _surface_inputs(pred, gt) -> tuple[torch.Tensor, torch.Tensor, bool, bool]:
    p, g = _as_bool_tensor(pred, "pred"), _as_bool_tensor(gt, "gt")
    _check_pair(p, g)
    if p.ndim not in (2, 3):
        raise ValueError(f"surface metrics take one 2D [H, W] or 3D [D, H, W] mask, got shape {tuple(p.shape)}")
    return p[None, None], g[None, None], bool(p.any()), bool(g.any())


@contextmanager
def _quiet_monai() -> Iterator[None]:
    """MONAI 1.5-1.6 warns about its own internal use of a deprecated argument on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        yield


def normalized_surface_dice(
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    spacing: Sequence[float] | float | None = None,
    tolerance_mm: float = 2.0,
) -> float:
    """NSD of one 2D [H, W] or 3D [D, H, W] mask pair: the fraction of both surfaces lying within
    `tolerance_mm` of the other surface. spacing: per array axis (mm); None -> 1 (pixels)."""
    from monai.metrics import compute_surface_dice

    p, g, p_any, g_any = _surface_inputs(pred, gt)
    if not (p_any and g_any):
        return 1.0 if p_any == g_any else 0.0
    with _quiet_monai():
        value = compute_surface_dice(
            p, g, [float(tolerance_mm)], include_background=True, spacing=_spacing(spacing, p.ndim - 2)
        )
    return float(value[0, 0])


def hd95(
    pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor, spacing: Sequence[float] | float | None = None
) -> float:
    """95th-percentile symmetric Hausdorff distance (mm) of one 2D or 3D mask pair.
    One mask empty -> inf, both empty -> 0 (module convention)."""
    from monai.metrics import compute_hausdorff_distance

    p, g, p_any, g_any = _surface_inputs(pred, gt)
    if not (p_any and g_any):
        return 0.0 if p_any == g_any else math.inf
    with _quiet_monai():
        value = compute_hausdorff_distance(
            p, g, include_background=True, percentile=95, spacing=_spacing(spacing, p.ndim - 2)
        )
    return float(value[0, 0])


def _class_names(classes: Mapping[int, str] | Sequence[int]) -> dict[int, str]:
    if isinstance(classes, Mapping):
        return {int(k): str(v) for k, v in classes.items()}
    return {int(c): str(int(c)) for c in classes}


def case_metrics(
    pred_labels: np.ndarray | torch.Tensor,
    gt_labels: np.ndarray | torch.Tensor,
    *,
    spacing: Sequence[float] | float | None,
    classes: Mapping[int, str] | Sequence[int],
    tolerance_mm: float = 2.0,
    metrics: Sequence[str] = METRICS,
) -> dict[str, dict[str, float]]:
    """Metrics of every class of one case.

    Args:
        pred_labels: int label map [D, H, W] (or [H, W] for a 2D image / slice), 0 = background.
        gt_labels: int label map of the same shape.
        spacing: voxel size per array axis in mm (z, y, x for a volume); None -> 1 (pixels).
        classes: label values to score, or a mapping label value -> class name.
        tolerance_mm: NSD tolerance.
        metrics: subset of ("dice", "iou", "nsd", "hd95").
    Returns:
        {class name: {metric: value}}.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
    pred, gt = _to_tensor(pred_labels), _to_tensor(gt_labels)
    _check_pair(pred, gt)
    if pred.is_floating_point() or gt.is_floating_point():
        raise ValueError(f"label maps must be integer arrays, got {pred.dtype} and {gt.dtype}")
    out: dict[str, dict[str, float]] = {}
    for value, name in _class_names(classes).items():
        p, g = pred == value, gt == value
        row: dict[str, float] = {}
        if "dice" in metrics:
            row["dice"] = float(dice(p[None], g[None])[0])
        if "iou" in metrics:
            row["iou"] = float(iou(p[None], g[None])[0])
        if "nsd" in metrics:
            row["nsd"] = normalized_surface_dice(p, g, spacing, tolerance_mm)
        if "hd95" in metrics:
            row["hd95"] = hd95(p, g, spacing)
        out[name] = row
    return out


def slice_metrics(
    pred_labels: np.ndarray | torch.Tensor,
    gt_labels: np.ndarray | torch.Tensor,
    *,
    spacing: Sequence[float] | float | None,
    classes: Mapping[int, str] | Sequence[int],
    axis: int = 0,
    tolerance_mm: float = 2.0,
    metrics: Sequence[str] = METRICS,
) -> dict[int, dict[str, dict[str, float]]]:
    """Per-2D-slice metrics of a 3D case: {slice index: case_metrics of that slice}, using the
    in-plane spacing. Slices where neither prediction nor ground truth has a scored class are skipped
    (they would only add perfect empty-vs-empty scores)."""
    pred, gt = np.asarray(pred_labels), np.asarray(gt_labels)
    if pred.ndim != 3:
        raise ValueError(f"slice_metrics needs a 3D label volume, got shape {pred.shape}")
    sp = _spacing(spacing, 3)
    in_plane = [s for i, s in enumerate(sp) if i != axis]
    values = list(_class_names(classes))
    out = {}
    for k in range(pred.shape[axis]):
        p, g = np.take(pred, k, axis=axis), np.take(gt, k, axis=axis)
        if not (np.isin(p, values).any() or np.isin(g, values).any()):
            continue
        out[k] = case_metrics(p, g, spacing=in_plane, classes=classes, tolerance_mm=tolerance_mm, metrics=metrics)
    return out


def _stats(values: Sequence[float]) -> dict[str, float | int]:
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    return {
        "mean": float(finite.mean()) if finite.size else math.nan,
        "std": float(finite.std()) if finite.size else math.nan,  # population std (ddof 0)
        "n": int(finite.size),
        "n_inf": int(np.isinf(arr).sum()),
    }


def summarize(per_case: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict:
    """Mean / std over cases, per class and overall.

    Args:
        per_case: {case id: {class name: {metric: value}}} (from `case_metrics`).
    Returns:
        {"per_class": {class: {metric: {mean, std, n, n_inf}}}, "overall": {metric: {mean, std, n, n_inf}}}.
        Infinite values (HD95 of a missed or hallucinated class) are excluded from mean/std and counted
        in `n_inf`; std is the population std. "overall" averages each case over its classes (finite
        values only) and then takes mean / std over cases; with no infinite values its mean equals the
        mean of the per-class means.
    """
    per_class: dict[str, dict[str, list[float]]] = {}
    overall: dict[str, list[float]] = {}
    for case in per_case.values():
        case_values: dict[str, list[float]] = {}
        for cls, row in case.items():
            for metric, v in row.items():
                per_class.setdefault(cls, {}).setdefault(metric, []).append(float(v))
                case_values.setdefault(metric, []).append(float(v))
        for metric, vs in case_values.items():
            arr = np.asarray(vs)
            finite = arr[np.isfinite(arr)]
            overall.setdefault(metric, []).append(float(finite.mean()) if finite.size else math.inf)
    return {
        "per_class": {c: {m: _stats(v) for m, v in rows.items()} for c, rows in per_class.items()},
        "overall": {m: _stats(v) for m, v in overall.items()},
    }
