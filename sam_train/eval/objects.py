"""Per-object Dice at the image's native resolution: a tight box, then simulated correction clicks.

The protocol of the medical fine-tuning evaluation and of `benchmarks/medical_finetune.py`, for any model
with the `Sam` API:
- an object is one ground-truth mask of one image (one class in one slice for medical data) with at
  least `min_area` pixels at the native resolution;
- the first prompt is the mask's tight box (inclusive pixel corners), scaled to the model input like the
  image; the predicted low-res logits are upsampled to the native size (`Sam.postprocess_masks`) and
  thresholded there, so Dice is measured on the pixels the ground truth has;
- each correction click goes to the deepest error pixel of the current native prediction
  (`eval.clicks.next_click`, RITM's clicker: positive in a miss, negative in a false positive), is added to
  the box, and the previous low-res logits are fed back as the mask prompt (the prompt layout of
  training: clicks, then the two box corners);
- with `merge`, each click only edits the region it was put in (`eval.clicks.progressive_merge`, FocalClick's
  progressive merge); the model's own logits are still fed back;
- the filled-box baseline predicts the box itself.
Results are per object (`ObjectScores`); summaries average over objects, per class and overall.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sam_train.eval.clicks import next_click, progressive_merge
from sam_train.eval.metrics import dice
from sam_train.eval.prompted import filled_boxes
from sam_train.models.resize import preprocess_shape, scale_boxes, scale_coords
from sam_train.models.sam import Sam
from sam_train.prompts.boxes import box_corner_points, masks_to_boxes

DEFAULT_CLICKS = (1, 3, 5)


@torch.no_grad()
def box_then_clicks(
    model: Sam,
    embedding: torch.Tensor,
    masks: torch.Tensor,
    *,
    clicks: Sequence[int] = DEFAULT_CLICKS,
    trace: bool = False,
    merge: bool = False,
) -> dict[str, torch.Tensor]:
    """Dice per object of one image: box prompt, then up to max(clicks) correction clicks.

    Args:
        model: a SAM (its decoder and `postprocess_masks` are used).
        embedding: [C, h, w] image embedding of the image resized (longest side) and padded to the input.
        masks: bool [M, H, W] ground-truth objects at the native resolution, none empty.
        clicks: click counts to report (Dice after that many clicks on top of the box).
        trace: also return every click's label and depth (`next_click`), to see which errors clicks meet.
        merge: progressive merge: a click changes the mask only in the changed region connected to it.
    Returns:
        {"box": float [M], "clicks_<k>": float [M] for k in clicks, "filled_box": float [M]}; with trace
        also "click_labels" int64 [M, K] and "click_depths" float [M, K], K = max(clicks).
    """
    m, (h, w) = masks.shape[0], tuple(masks.shape[-2:])
    n_clicks = max(clicks, default=0)
    keys = ["box", *(f"clicks_{k}" for k in clicks), "filled_box"]
    out: dict[str, torch.Tensor] = {}
    if m == 0:
        empty = {k: torch.zeros(0) for k in keys}
        return {**empty, "click_labels": torch.zeros(0, n_clicks, dtype=torch.long),
                "click_depths": torch.zeros(0, n_clicks)} if trace else empty
    device, s = embedding.device, model.img_size
    gt = masks.cpu()
    boxes = masks_to_boxes(gt)  # [M, 4] inclusive pixel corners at the native size
    out["filled_box"] = dice(filled_boxes(boxes, (h, w)), gt)
    corners, corner_labels = box_corner_points(scale_boxes(boxes, (h, w), s).to(device))
    input_size = preprocess_shape(h, w, s)
    image_ids = torch.zeros(m, dtype=torch.long, device=device)
    emb = embedding[None]
    click_xy = torch.zeros(m, 0, 2, device=device)
    click_lbl = torch.zeros(m, 0, dtype=torch.long, device=device)
    prev = None
    shown = xy = lbl = None  # the mask shown after the last click; that click (native)
    wanted = set(clicks)
    depths: list[torch.Tensor] = []
    for k in range(n_clicks + 1):
        coords = torch.cat([click_xy, corners], dim=1)
        labels = torch.cat([click_lbl, corner_labels], dim=1)
        low, _ = model.decode(emb, image_ids, coords, labels, mask_inputs=prev)
        prev = low[:, :1]
        pred = (model.postprocess_masks(prev, input_size, (h, w))[:, 0] > model.mask_threshold).cpu()
        if merge and k > 0:
            pred = progressive_merge(shown, pred, xy, lbl)
        shown = pred
        if k == 0:
            out["box"] = dice(pred, gt)
        elif k in wanted:
            out[f"clicks_{k}"] = dice(pred, gt)
        if k < n_clicks:
            xy, lbl, depth = next_click(pred, gt, return_depth=True)  # native (x, y); -1 once perfect
            depths.append(depth)
            click_xy = torch.cat([click_xy, scale_coords(xy, (h, w), s).to(device)[:, None]], dim=1)
            click_lbl = torch.cat([click_lbl, lbl.to(device)[:, None]], dim=1)
    if trace:
        out["click_labels"] = click_lbl.cpu()
        out["click_depths"] = torch.stack(depths, 1) if depths else torch.zeros(m, 0)
        keys += ["click_labels", "click_depths"]
    return {k: out[k] for k in keys}


@dataclass
class ObjectScores:
    """Per-object Dice of every protocol, with the class and case of each object."""

    clicks: tuple[int, ...] = DEFAULT_CLICKS
    scores: dict[str, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    class_ids: list[int] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        return ["box", *(f"clicks_{k}" for k in self.clicks), "filled_box"]

    def add(self, scores: Mapping[str, torch.Tensor], class_ids: Sequence[int], case: str) -> None:
        for k in self.columns:
            self.scores[k].append(scores[k].float().cpu())
        self.class_ids += [int(c) for c in class_ids]
        self.cases += [case] * len(class_ids)

    def per_object(self) -> dict[str, np.ndarray]:
        return {k: torch.cat(v).numpy() if v else np.zeros(0) for k, v in self.scores.items()}

    def summary(self, names: Mapping[int, str] | None = None) -> dict[str, dict[str, float]]:
        """{"overall": {column: mean over objects, "n": count}, "per_class": {name: {...}}}."""
        values = self.per_object()
        cls = np.asarray(self.class_ids)
        names = dict(names or {})

        def row(sel: np.ndarray) -> dict[str, float]:
            return {**{k: float(values[k][sel].mean()) for k in self.columns}, "n": int(sel.sum())}

        out: dict[str, dict] = {"overall": row(np.ones(len(cls), bool)) if len(cls) else {}, "per_class": {}}
        for c in sorted(set(cls.tolist())):
            out["per_class"][names.get(c, f"class_{c}" if c >= 0 else "object")] = row(cls == c)
        return out


def format_object_table(summary: Mapping[str, Mapping[str, Mapping[str, float]]], clicks: Sequence[int]) -> str:
    """Plain-text table: one row per class (label names) and the mean over all objects."""
    header = ["class", "objects", "box", *(f"+{k} click" + ("s" if k > 1 else "") for k in clicks), "filled box"]
    cols = ["box", *(f"clicks_{k}" for k in clicks), "filled_box"]
    rows = [[name, str(r["n"]), *(f"{r[c]:.4f}" for c in cols)] for name, r in summary["per_class"].items()]
    body = rows + ([["mean (objects)", str(summary["overall"]["n"]), *(f"{summary['overall'][c]:.4f}" for c in cols)]]
                   if summary.get("overall") else [])
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    if summary.get("overall"):
        out += [line(["-" * w for w in widths]), line(body[-1])]
    return "\n".join(out)
