"""Prompted evaluation on a data set: Dice/IoU per case and class for box / point prompts.

Objects come from ground truth (one per label per slice for medical data), so the Dice of a class in
a case is 2 * sum|P n G| / (sum|P| + sum|G|) over that case's slices, i.e. the 3D Dice restricted to
slices where the class is present. The filled-box baseline predicts the prompt box itself.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from sam_train.models.prompt_encoder import PAD, POSITIVE
from sam_train.models.sam import Sam, upsample_logits
from sam_train.prompts.boxes import box_corner_points, masks_to_boxes
from sam_train.prompts.points import center_points


@dataclass
class OverlapAccumulator:
    """Sums of |P n G|, |P| and |G| per (case, class) -> Dice / IoU per case, then mean over cases."""

    sums: dict[tuple[str, int], list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0, 0.0]))

    def update(self, pred: torch.Tensor, gt: torch.Tensor, cases: list[str], classes: list[int]) -> None:
        inter = (pred & gt).flatten(1).sum(1).tolist()
        p, g = pred.flatten(1).sum(1).tolist(), gt.flatten(1).sum(1).tolist()
        for i, key in enumerate(zip(cases, classes, strict=True)):
            s = self.sums[key]
            s[0], s[1], s[2] = s[0] + inter[i], s[1] + p[i], s[2] + g[i]

    def per_case(self) -> dict[tuple[str, int], dict[str, float]]:
        out = {}
        for key, (inter, p, g) in self.sums.items():
            union = p + g - inter
            out[key] = {"dice": 2 * inter / (p + g) if p + g else 1.0, "iou": inter / union if union else 1.0}
        return out

    def summary(self) -> dict[str, float]:
        cases = self.per_case()
        if not cases:
            return {"dice": float("nan"), "iou": float("nan")}
        return {m: sum(v[m] for v in cases.values()) / len(cases) for m in ("dice", "iou")}


def box_prompts(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tight boxes of [M, S, S] masks as labelled corner points: coords [M, 2, 2], labels [M, 2], boxes [M, 4]."""
    boxes = masks_to_boxes(masks)
    return (*box_corner_points(boxes), boxes)


def center_point_prompts(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One positive point per mask, its centre click (`prompts.points.center_points`), plus padding:
    coords [M, 2, 2], labels [M, 2]."""
    pts = center_points(masks)[0].to(masks.device)
    coords = torch.stack([pts, torch.zeros_like(pts)], dim=1)
    labels = torch.tensor([POSITIVE, PAD], device=masks.device).expand(len(pts), 2)
    return coords, labels


def filled_boxes(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[M, 4] boxes -> [M, H, W] bool masks of the filled boxes (inclusive pixel corners)."""
    h, w = size
    ys = torch.arange(h, device=boxes.device).view(1, h, 1)
    xs = torch.arange(w, device=boxes.device).view(1, 1, w)
    x0, y0, x1, y1 = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    return (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)


@torch.no_grad()
def predict_objects(
    model: Sam, batch: dict[str, Any], coords: torch.Tensor, labels: torch.Tensor, multimask: bool
) -> torch.Tensor:
    """Masks bool [M, S, S] (model-input resolution) for prompts on every object of a collated batch
    (`Sam.predict_masks` on `Sam.batch_embeddings`; `multimask`: the best-rated multimask output, for an
    ambiguous lone point)."""
    emb = model.batch_embeddings(batch)
    _, logits = model.predict_masks(emb, batch["image_ids"], coords, labels, multimask=multimask)
    return logits > model.mask_threshold


def valid_region(batch: dict[str, Any]) -> torch.Tensor:
    """[M, S, S] bool: the un-padded part of each object's image."""
    s = batch["masks"].shape[-1]
    sizes = batch["input_sizes"][batch["image_ids"]]
    ar = torch.arange(s, device=sizes.device)
    return (ar.view(1, s, 1) < sizes[:, 0].view(-1, 1, 1)) & (ar.view(1, 1, s) < sizes[:, 1].view(-1, 1, 1))


MODES = ("box", "point", "filled_box")


class PromptedEvaluator:
    """Accumulates box / point / filled-box Dice and IoU per (case, class) over collated batches.

    Batches may carry `embeddings` (computed once by the caller and shared with other protocols);
    otherwise the images are encoded here.
    """

    def __init__(self, modes: Iterable[str] = MODES) -> None:
        self.modes = tuple(modes)
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"unknown prompt mode(s) {unknown}; valid: {', '.join(MODES)}")
        self.acc = {m: OverlapAccumulator() for m in self.modes}

    @torch.no_grad()
    def update(
        self,
        model: Sam,
        batch: dict[str, Any],
        *,
        boxes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        box_logits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Score one batch (on the model's device); returns each mode's masks bool [M, S, S] (padding cleared).

        boxes / box_logits: the batch's `box_prompts` and their decoded single-mask logits [M, 1, h, w] when
        the caller has them already (the evaluation decodes box prompts once per batch)."""
        gt = batch["masks"]
        if gt.shape[0] == 0:
            return {m: gt for m in self.modes}
        valid = valid_region(batch)
        ids = batch["image_ids"].tolist()
        cases = [str(batch["meta"][i].get("case_id", batch["ids"][i])) for i in ids]
        classes = batch["class_ids"].tolist()
        coords, labels, boxes = box_prompts(gt) if boxes is None else boxes
        preds = {}
        for mode in self.modes:
            if mode == "box" and box_logits is not None:
                pred = upsample_logits(box_logits, model.img_size) > model.mask_threshold
            elif mode == "box":
                pred = predict_objects(model, batch, coords, labels, multimask=False)
            elif mode == "point":
                pred = predict_objects(model, batch, *center_point_prompts(gt), multimask=True)
            else:
                pred = filled_boxes(boxes, gt.shape[-2:])
            preds[mode] = pred & valid
            self.acc[mode].update(preds[mode], gt, cases, classes)
        return preds

    def result(self) -> dict[str, Any]:
        """{mode: {"dice": mean over (case, class), "iou": ..., "per_case": {"<case>/class_<c>": {dice, iou}}}}."""
        return {
            mode: {
                **a.summary(),
                "per_case": {f"{case}/class_{cls}": v for (case, cls), v in sorted(a.per_case().items())},
            }
            for mode, a in self.acc.items()
        }


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def evaluate_prompted(model: Sam, batches: Iterable[dict[str, Any]], modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    """Dice / IoU per prompt mode, per (case, class) and averaged over them (see `PromptedEvaluator`)."""
    model.eval()
    evaluator = PromptedEvaluator(modes)
    for batch in batches:
        evaluator.update(model, to_device(batch, model.device))
    return evaluator.result()
