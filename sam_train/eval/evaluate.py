"""Model-agnostic evaluation of saved or in-memory label predictions against ground truth.

`evaluate_predictions` takes per-case predicted and ground-truth label maps (3D volumes, or 2D
images), computes `metrics.case_metrics` per case (and per 2D slice on request), summarises them,
writes `metrics.json` and a text table, and optionally saves overlays. `sam-train eval` runs the
model, saves predictions with `saving.save_label_volume`, and then calls this on the directories, so
the reported numbers are exactly what anyone recomputes from the files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sam_train.eval.metrics import METRICS, case_metrics, slice_metrics, summarize
from sam_train.eval.report import format_table, write_metrics_json
from sam_train.eval.saving import VOLUME_SUFFIXES, case_id_of, load_label_volume

Cases = Mapping[str, np.ndarray] | str | Path


def _volume_files(directory: Path) -> dict[str, Path]:
    if not directory.is_dir():
        raise FileNotFoundError(f"label directory {directory} does not exist")
    files = {case_id_of(p): p for p in sorted(directory.iterdir()) if p.name.endswith(VOLUME_SUFFIXES)}
    if not files:
        raise FileNotFoundError(f"no label volumes ({', '.join(VOLUME_SUFFIXES)}) in {directory}")
    return files


def _load_dirs(pred_dir: Path, gt_dir: Path) -> tuple[dict, dict, dict]:
    """-> (pred arrays, gt arrays, spacing per case in array z-y-x order, from the gt files)."""
    gt_files, pred_files = _volume_files(gt_dir), _volume_files(pred_dir)
    missing = sorted(set(gt_files) - set(pred_files))
    if missing:
        raise FileNotFoundError(f"no prediction in {pred_dir} for ground-truth cases {missing}")
    preds, gts, spacing = {}, {}, {}
    for case, gt_path in gt_files.items():
        gts[case], gt_geom = load_label_volume(gt_path)
        preds[case], pred_geom = load_label_volume(pred_files[case])
        if not pred_geom.allclose(gt_geom):
            raise ValueError(
                f"prediction {pred_files[case]} has geometry {pred_geom} but ground truth {gt_path} has {gt_geom}"
            )
        spacing[case] = gt_geom.spacing_zyx
    return preds, gts, spacing


def _class_map(classes, gts: Mapping[str, np.ndarray]) -> dict[int, str]:
    if classes is None:
        values = sorted({int(v) for g in gts.values() for v in np.unique(g) if v != 0})
        return {v: str(v) for v in values}
    if isinstance(classes, Mapping):
        return {int(k): str(v) for k, v in classes.items()}
    return {int(c): str(int(c)) for c in classes}


def evaluate_predictions(
    predictions: Cases,
    ground_truth: Cases,
    *,
    classes: Mapping[int, str] | Sequence[int] | None = None,
    spacing: Mapping[str, Sequence[float]] | Sequence[float] | None = None,
    tolerance_mm: float = 2.0,
    metrics: Sequence[str] = METRICS,
    per_slice: bool = False,
    slice_axis: int = 0,
    out_dir: str | Path | None = None,
    images: Mapping[str, np.ndarray] | None = None,
    num_overlays: int = 0,
    print_table: bool = True,
) -> dict:
    """Score predicted label maps against ground truth.

    Args:
        predictions: {case id: int label map [D, H, W] or [H, W]}, or a directory of label volumes
            named like the ground-truth files (`<case>.nii.gz`).
        ground_truth: same form as `predictions`. With directories, each case's spacing is read from
            its ground-truth file and the prediction's geometry must match it.
        classes: label values to score, or {value: name}; None -> every non-zero value in the
            ground truth.
        spacing: for arrays, per-axis voxel size in array order (z, y, x), one for all cases or a
            {case id: spacing} mapping; None -> 1 (distances in pixels). Ignored for directories.
        tolerance_mm: NSD tolerance.
        metrics: subset of ("dice", "iou", "nsd", "hd95").
        per_slice: also score every 2D slice along `slice_axis` (3D cases only).
        out_dir: where to write `metrics.json`, `metrics_table.txt` and `overlays/`; None -> nothing written.
        images: {case id: image array} for overlays (grey [D, H, W] / [H, W], or uint8 [3, H, W]).
        num_overlays: how many cases get an overlay (3D: the slice with the most ground truth).
        print_table: print the summary table.
    Returns:
        {"config": ..., "per_case": {case: {class: {metric: value}}}, "summary": `summarize` result,
         and with per_slice "per_slice": {case: {slice: ...}}, "per_slice_summary"}. Values are
        floats (inf allowed); metrics.json writes non-finite values as null.
    """
    if isinstance(predictions, (str, Path)) != isinstance(ground_truth, (str, Path)):
        raise ValueError("predictions and ground_truth must both be directories or both be mappings of arrays")
    if isinstance(predictions, (str, Path)):
        preds, gts, spacings = _load_dirs(Path(predictions), Path(ground_truth))
    else:
        preds, gts = dict(predictions), dict(ground_truth)
        missing = sorted(set(gts) - set(preds))
        if missing:
            raise KeyError(f"no prediction for ground-truth cases {missing}")
        if spacing is None or isinstance(spacing, Mapping):
            spacings = {c: (spacing or {}).get(c) for c in gts}
        else:
            spacings = {c: tuple(spacing) for c in gts}
    class_map = _class_map(classes, gts)

    per_case, slices = {}, {}
    for case in sorted(gts):
        pred, gt = np.asarray(preds[case]), np.asarray(gts[case])
        if pred.shape != gt.shape:
            raise ValueError(f"case {case}: prediction shape {pred.shape} != ground truth shape {gt.shape}")
        kwargs = dict(spacing=spacings[case], classes=class_map, tolerance_mm=tolerance_mm, metrics=metrics)
        per_case[case] = case_metrics(pred, gt, **kwargs)
        if per_slice and gt.ndim == 3:
            slices[case] = slice_metrics(pred, gt, axis=slice_axis, **kwargs)

    result: dict = {
        "config": {
            "classes": class_map,
            "tolerance_mm": float(tolerance_mm),
            "metrics": list(metrics),
            "spacing": {c: (list(s) if s is not None else None) for c, s in spacings.items()},
            "spacing_order": "array axes (z, y, x for volumes)",
        },
        "per_case": per_case,
        "summary": summarize(per_case),
    }
    if per_slice:
        result["per_slice"] = slices
        flat = {f"{c}/{k}": row for c, rows in slices.items() for k, row in rows.items()}
        result["per_slice_summary"] = summarize(flat)

    table = format_table(result["summary"])
    if print_table:
        print(table)
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_metrics_json(result, out_dir / "metrics.json")
        (out_dir / "metrics_table.txt").write_text(table + "\n")
        if num_overlays and images:
            _save_case_overlays(preds, gts, images, out_dir / "overlays", num_overlays, slice_axis)
    return result


def _save_case_overlays(preds, gts, images, out_dir: Path, k: int, axis: int) -> None:
    from sam_train.eval.overlays import largest_slice, save_overlays, to_uint8

    items = []
    for case in sorted(gts):
        if case not in images:
            continue
        image, pred, gt = np.asarray(images[case]), np.asarray(preds[case]), np.asarray(gts[case])
        if gt.ndim == 3:
            index = largest_slice(gt, axis)
            pred, gt = np.take(pred, index, axis), np.take(gt, index, axis)
            image = np.take(image, index, axis)
            case = f"{case}_slice{index}"
        rgb = image if (image.ndim == 3 and image.dtype == np.uint8) else to_uint8(image)
        items.append({"id": case, "image": rgb, "pred": pred, "gt": gt})
        if len(items) >= k:
            break
    save_overlays(items, out_dir, max_cases=k)
