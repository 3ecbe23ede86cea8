"""The evaluation protocols, one class each: `update(batch)` per val batch, `compute(run_dir)` at the end.

Every protocol reads an `EvalBatch`: the collated batch on the model's device with its image embeddings
(encoded once by the loop), and the per-batch work protocols share, done once on first use: the tight
box prompts of the ground-truth objects, their box decode (the prompted box masks and the original-size
predictions both come from it), the original-size box masks and the click predictor on non-empty objects.
`compute` returns a `Section` (structured results for metrics.json, flat summary numbers, table lines)
or None when the protocol has nothing to report; `sam_train.eval.report.write_report` assembles them.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sam_train.data.label_maps import masks_to_label_map
from sam_train.eval.clicks import click_protocol, number_of_clicks, plot_iou_curve, sam_med2d_protocol
from sam_train.eval.config import (
    AttackConfig,
    ClicksConfig,
    ObjectsConfig,
    PredictionsConfig,
    SamMed2dConfig,
    VolumesConfig,
)
from sam_train.eval.metrics import summarize
from sam_train.eval.objects import ObjectScores, box_then_clicks, format_object_table
from sam_train.eval.overlays import save_overlays
from sam_train.eval.prompted import PromptedEvaluator, box_prompts, valid_region
from sam_train.eval.report import format_table
from sam_train.eval.saving import save_coco_rle, save_png_labels
from sam_train.eval.volumes import VolumeCollector
from sam_train.io import safe_file_name
from sam_train.models.sam import Sam

log = logging.getLogger(__name__)


@dataclass
class Section:
    """What one protocol reports: `results` merged into metrics.json, `summary` into its flat "summary"
    ({"eval/<protocol>/...": number}), `lines` into the printed table."""

    results: dict[str, Any]
    summary: dict[str, float] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


def click_predict_fn(model: Sam, embeddings: torch.Tensor, image_ids: torch.Tensor, valid: torch.Tensor):
    """`predict_fn` of `eval.clicks` on one batch: prompts -> logits [M, S, S] (padding forced negative).

    A lone click takes the multimask output SAM rates best (the point is ambiguous); with more prompts or
    a previous mask, the single-mask token. A padding point is appended when there is no box, as the
    official predictor does.
    """
    dev = embeddings.device

    def predict(points: torch.Tensor, labels: torch.Tensor, prev: torch.Tensor | None):
        pts, lab = points.to(dev), labels.to(dev)
        if not (lab >= 2).any():
            pts = torch.cat([pts, torch.zeros_like(pts[:, :1])], dim=1)
            lab = torch.cat([lab, torch.full_like(lab[:, :1], -1)], dim=1)
        single_click = points.shape[1] == 1 and prev is None and not (labels >= 2).any()
        chosen, logits = model.predict_masks(embeddings, image_ids, pts, lab, multimask=single_click, mask_inputs=prev)
        return logits.masked_fill(~valid, -1e4).cpu(), chosen

    return predict


@dataclass
class OriginalSizeMasks:
    """Box-prompted masks of one image at its original size, with the objects' class ids."""

    image_id: str
    meta: Mapping[str, Any]
    masks: torch.Tensor  # bool [N, H, W]
    class_ids: torch.Tensor  # [N]


class EvalBatch:
    """One val batch (on the model's device, embeddings included) and the work its protocols share;
    `initial_embeddings`: the batch's embeddings under the weights a fine-tune started from, if scored."""

    def __init__(self, model: Sam, batch: dict[str, Any], first_index: int, run_dir: Path,
                 initial_embeddings: torch.Tensor | None = None) -> None:
        self.model, self.batch, self.first_index, self.run_dir = model, batch, first_index, run_dir
        self.initial_embeddings = initial_embeddings
        self.prompted: dict[str, torch.Tensor] = {}  # set by PromptedDice: each mode's masks [M, S, S]
        self._cache: dict[str, Any] = {}

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        """make(), computed once per batch under `key` (work that several protocols share)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def num_images(self) -> int:
        return len(self.batch["ids"])

    @property
    def num_objects(self) -> int:
        return int(self.batch["masks"].shape[0])

    def boxes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tight box prompts of the ground-truth objects: coords [M, 2, 2], labels [M, 2], boxes [M, 4]."""
        return self.once("boxes", lambda: box_prompts(self.batch["masks"]))

    def box_logits(self) -> torch.Tensor:
        """Low-res single-mask logits [M, 1, h, w] of the box prompts: the batch's one box decode."""

        def decode() -> torch.Tensor:
            coords, labels, _ = self.boxes()
            low, _ = self.model.decode(self.batch["embeddings"], self.batch["image_ids"], coords, labels)
            return low[:, :1]

        return self.once("box_logits", decode)

    def original_size_masks(self) -> list[OriginalSizeMasks]:
        """Box predictions at each image's original size."""

        def make() -> list[OriginalSizeMasks]:
            model, batch = self.model, self.batch
            low = self.box_logits() if self.num_objects else None
            out = []
            for b, image_id in enumerate(batch["ids"]):
                sel = (batch["image_ids"] == b).nonzero().flatten()
                size = tuple(batch["original_sizes"][b].tolist())
                if len(sel):
                    logits = model.postprocess_masks(low[sel], tuple(batch["input_sizes"][b].tolist()), size)
                    masks = (logits[:, 0] > model.mask_threshold).cpu()
                else:
                    masks = torch.zeros(0, *size, dtype=torch.bool)
                out.append(OriginalSizeMasks(image_id, batch["meta"][b], masks, batch["class_ids"][sel].cpu()))
            return out

        return self.once("original_size", make)

    def click_targets(self):
        """(predict_fn, gt bool [K, S, S] on the CPU) for the batch's non-empty objects; None without any."""

        def make():
            gt, ids = self.batch["masks"], self.batch["image_ids"]
            keep = gt.flatten(1).any(1)
            if not keep.any():
                return None
            valid = valid_region(self.batch)[keep]
            return click_predict_fn(self.model, self.batch["embeddings"], ids[keep], valid), gt[keep].cpu()

        return self.once("click_targets", make)

    def image_crops(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image b's content crop (uint8 [3, h, w]), its objects' masks [N, h, w] and their indices in the batch."""
        h, w = self.batch["input_sizes"][b].tolist()
        sel = (self.batch["image_ids"] == b).nonzero().flatten()
        return self.batch["images"][b, :, :h, :w].cpu(), self.batch["masks"][sel, :h, :w].cpu(), sel


class Protocol:
    """An evaluation protocol: accumulates over batches, reports once."""

    def update(self, batch: EvalBatch) -> None:
        raise NotImplementedError

    def compute(self, run_dir: Path) -> Section | None:
        raise NotImplementedError


def label_names(dataset: Any) -> dict[int, str]:
    """{label value: name} of a data set: dataset.json "labels" of a medical folder, or its `class_names`."""
    if dataset is None:
        return {}
    if getattr(dataset, "root", None) is not None and hasattr(dataset, "cases"):
        from sam_train.data.medical_io import read_dataset_json
        from sam_train.eval.volumes import class_names

        return {k: v for k, v in class_names(read_dataset_json(Path(dataset.root))).items() if k != 0}
    names = getattr(dataset, "class_names", None)
    return {int(k): str(v) for k, v in dict(names).items()} if names else {}


def _per_case_table(prompted: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """{mode: {per_case: {"<case>/class_<c>": {dice, iou}}}} -> {case: {class: {"<mode> dice": v}}} for summarize."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for mode, r in prompted.items():
        for key, values in r["per_case"].items():
            case, _, cls = key.rpartition("/")
            row = table.setdefault(case, {}).setdefault(cls, {})
            row.update({f"{mode} {m}": v for m, v in values.items()})
    return table


class PromptedDice(Protocol):
    """Dice / IoU per (case, class) for box / point / filled-box prompts at the model-input resolution."""

    def __init__(self, modes: tuple[str, ...], names: Mapping[int, str]) -> None:
        self.evaluator = PromptedEvaluator(modes)
        self.names = dict(names)

    def update(self, batch: EvalBatch) -> None:
        shared: dict[str, Any] = {}
        if batch.num_objects:
            shared["boxes"] = batch.boxes()
            if "box" in self.evaluator.modes:
                shared["box_logits"] = batch.box_logits()
        batch.prompted = self.evaluator.update(batch.model, batch.batch, **shared)

    def compute(self, run_dir: Path) -> Section:
        prompted = self.evaluator.result()
        flat: dict[str, float] = {}
        for mode, r in prompted.items():
            flat[f"eval/{mode}/dice"], flat[f"eval/{mode}/iou"] = r["dice"], r["iou"]
        summary = summarize(_per_case_table(prompted))
        summary["per_class"] = {
            self.names.get(int(k.split("_")[-1]), k): v
            for k, v in sorted(summary["per_class"].items(), key=lambda kv: int(kv[0].split("_")[-1]))
        }
        lines = ["prompted (Dice / IoU per case and class; mean ± std over cases):", format_table(summary)]
        return Section({"prompted": prompted, "prompted_summary": summary}, flat, lines)


class ClickCurve(Protocol):
    """Interactive clicks: IoU after 1..max_clicks simulated clicks, NoC per threshold, `iou_vs_clicks.png`."""

    def __init__(self, config: ClicksConfig) -> None:
        self.config = config
        self.ious: list[torch.Tensor] = []

    def update(self, batch: EvalBatch) -> None:
        targets = batch.click_targets()
        if targets is not None:
            predict, gt = targets
            out = click_protocol(predict, gt, max_clicks=self.config.max_clicks,
                                 iou_thresholds=self.config.iou_thresholds)
            self.ious.append(out["iou_per_click"])

    def compute(self, run_dir: Path) -> Section | None:
        if not self.ious:
            return None
        ious = torch.cat(self.ious)
        curve = ious.mean(0).tolist()
        out: dict[str, Any] = {"mean_iou_curve": curve, "max_clicks": len(curve), "num_objects": len(ious)}
        flat: dict[str, float] = {}
        for thr in self.config.iou_thresholds:
            key = f"noc{round(thr * 100)}"
            out[key] = float(number_of_clicks(ious, thr).float().mean())
            flat[f"eval/clicks/{key}"] = out[key]
        for k in sorted({1, 3, 5, len(curve)} & set(range(1, len(curve) + 1))):
            flat[f"eval/clicks/iou@{k}"] = curve[k - 1]
        out["plot"] = str(plot_iou_curve({"simulated clicks": curve}, run_dir / "iou_vs_clicks.png"))
        line = "clicks: " + ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in flat.items())
        return Section({"clicks": out}, flat, [line])


class SamMed2dPoints(Protocol):
    """SAM-Med2D's Dice with a box and with 1 / 3 / 5 points per object."""

    def __init__(self, config: SamMed2dConfig) -> None:
        self.config = config
        self.dice: dict[str, list[torch.Tensor]] = defaultdict(list)

    def update(self, batch: EvalBatch) -> None:
        targets = batch.click_targets()
        if targets is not None:
            predict, gt = targets
            out = sam_med2d_protocol(predict, gt, point_counts=self.config.point_counts)
            for k, v in out["dice_per_object"].items():
                self.dice[k].append(v)

    def compute(self, run_dir: Path) -> Section | None:
        if not self.dice:
            return None
        dice = {k: float(torch.cat(v).mean()) for k, v in self.dice.items()}
        result = {"dice": dice, "num_objects": len(torch.cat(next(iter(self.dice.values()))))}
        flat = {f"eval/sam_med2d/{k}/dice": v for k, v in dice.items()}
        return Section({"sam_med2d": result}, flat,
                       ["SAM-Med2D Dice: " + ", ".join(f"{k} {v:.4f}" for k, v in dice.items())])


class ObjectDice(Protocol):
    """Per object at the native resolution: tight box, then correction clicks on top of it, filled box;
    optionally box and filled box for `initial` (the weights the fine-tune started from, on the batch's
    `initial_embeddings`: its clicks are not scored, they would double the evaluation after every fit;
    the benchmark scores them)."""

    def __init__(self, config: ObjectsConfig, names: Mapping[int, str], *, dataset: Any = None,
                 initial: Sam | None = None) -> None:
        self.config, self.names, self.dataset = config, dict(names), dataset
        self.scores = ObjectScores(clicks=tuple(config.clicks))
        self.initial = initial.eval() if initial is not None else None
        self.initial_scores = ObjectScores(clicks=()) if initial is not None else None

    def _native_objects(self, batch: EvalBatch, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ground-truth masks bool [N, H, W] at the native size + class ids of image b of the batch: the
        val set's untransformed sample (the val loader is sequential), or the batch's masks cropped to
        the resized content when the data set cannot give it."""
        data, index = batch.batch, batch.first_index + b
        load = getattr(self.dataset, "try_load", None)
        raw = load(index) if load is not None and index < len(self.dataset) else None
        size = tuple(data["original_sizes"][b].tolist())
        if raw is not None and str(raw.get("id")) == str(data["ids"][b]) and tuple(raw["masks"].shape[-2:]) == size:
            return raw["masks"], raw["class_ids"]
        sel = (data["image_ids"] == b).nonzero().flatten()
        h, w = data["input_sizes"][b].tolist()
        return data["masks"][sel, :h, :w].cpu(), data["class_ids"][sel].cpu()

    def update(self, batch: EvalBatch) -> None:
        data = batch.batch
        for b in range(batch.num_images):
            masks, class_ids = self._native_objects(batch, b)
            keep = masks.flatten(1).sum(1) >= max(self.config.min_area, 1)
            if not keep.any():
                continue
            case = str(data["meta"][b].get("case_id", data["ids"][b]))
            for model, acc, embeddings in ((batch.model, self.scores, data["embeddings"]),
                                           (self.initial, self.initial_scores, batch.initial_embeddings)):
                if model is not None:
                    scores = box_then_clicks(model, embeddings[b], masks[keep], clicks=acc.clicks,
                                             merge=self.config.merge)
                    acc.add(scores, class_ids[keep].tolist(), case)

    def compute(self, run_dir: Path) -> Section | None:
        if not self.scores.class_ids:
            return None
        clicks = self.scores.clicks
        objects = self.scores.summary(self.names)
        result = {**objects, "clicks": list(clicks)}
        flat = {f"eval/objects/{k}/dice": v for k, v in objects["overall"].items() if k != "n"}
        lines = [
            "held-out objects (Dice per object at the native resolution: tight box, then correction clicks "
            "on top of it" + (", each merged into the region it was put in" if self.config.merge else "")
            + "; filled box = the box itself):",
            format_object_table(objects, clicks),
        ]
        if self.initial_scores is not None:
            start = self.initial_scores.summary(self.names)
            result["initial"] = start
            flat.update({f"eval/objects_initial/{k}/dice": v for k, v in start["overall"].items() if k != "n"})
            last = clicks[-1] if clicks else None
            lines.append(f"initial weights (before fine-tuning), same objects: box {start['overall']['box']:.4f}"
                         + f"; fine-tuned: box {objects['overall']['box']:.4f}"
                         + (f", +{last} clicks {objects['overall'][f'clicks_{last}']:.4f}" if last else "")
                         + f"; filled box {objects['overall']['filled_box']:.4f}")
        return Section({"objects": result}, flat, lines)


class Volumes(Protocol):
    """Medical slices: box predictions at the original size reassembled per case -> NIfTI + 3D metrics."""

    def __init__(self, config: VolumesConfig, collector: VolumeCollector) -> None:
        self.config, self.collector = config, collector

    def update(self, batch: EvalBatch) -> None:
        for pred in batch.original_size_masks():
            if "case_id" in pred.meta:
                self.collector.add(pred.meta, pred.masks, pred.class_ids)

    def compute(self, run_dir: Path) -> Section | None:
        if not self.collector.slices:
            return None
        vol = self.collector.finish(run_dir, asdict(self.config))
        flat = {f"eval/volume/{metric}": stat["mean"] for metric, stat in vol["summary"]["overall"].items()}
        return Section({"volumes": vol}, flat, ["3D per case (box prompts on every slice):",
                                                format_table(vol["summary"])])


class SavePredictions(Protocol):
    """2D box predictions at the original size: PNG instance label maps or one COCO RLE json. Images whose
    slices `Volumes` reassembles (`skip_volume_slices`) are left to it."""

    def __init__(self, config: PredictionsConfig, *, skip_volume_slices: bool = False) -> None:
        self.format, self.skip_volume_slices = config.format, skip_volume_slices
        self.coco: list[tuple[str, torch.Tensor, list[int]]] = []

    def update(self, batch: EvalBatch) -> None:
        for pred in batch.original_size_masks():
            if self.skip_volume_slices and "case_id" in pred.meta:
                continue
            if self.format == "png":
                instance = masks_to_label_map(pred.masks, torch.arange(1, len(pred.masks) + 1))
                save_png_labels(instance, batch.run_dir / "predictions" / f"{safe_file_name(pred.image_id)}.png")
            elif self.format == "coco":
                classes = [int(c) if c >= 0 else 1 for c in pred.class_ids.tolist()]
                self.coco.append((pred.image_id, pred.masks, classes))

    def compute(self, run_dir: Path) -> None:
        if self.coco:
            save_coco_rle(
                [m for _, m, _ in self.coco],
                [i for i, _, _ in self.coco],
                run_dir / "predictions" / "coco_results.json",
                category_ids=[c for _, _, c in self.coco],
            )


class EncoderAttack(Protocol):
    """PGD on the image encoder of the first images with objects: clean vs attacked IoU per prompt."""

    def __init__(self, config: AttackConfig, model: Sam, seed: int = 0) -> None:
        self.config, self.model, self.seed = config, model, seed
        self.samples: list[dict[str, Any]] = []

    def update(self, batch: EvalBatch) -> None:
        if not self.config.eps or "images" not in batch.batch or len(self.samples) >= self.config.max_images:
            return
        for b, image_id in enumerate(batch.batch["ids"]):
            image, gt, _ = batch.image_crops(b)
            if len(self.samples) < self.config.max_images and gt.flatten(1).any(1).any():
                self.samples.append({"image": image, "masks": gt, "id": image_id})

    def compute(self, run_dir: Path) -> Section | None:
        if not self.config.eps or not self.samples:
            return None
        from sam_train.eval.attack import robustness_report

        report = robustness_report(
            self.model,
            self.samples,
            [float(e) for e in self.config.eps],
            generator=torch.Generator().manual_seed(int(self.seed or 0)),
            prompts=tuple(self.config.prompts),
            steps=int(self.config.steps),
        )
        iou = {f"clean/{p}/iou": v for p, v in report["clean"].items()}
        for eps, per in report["attacked"].items():
            iou.update({f"eps={eps:g}/{p}/iou": v for p, v in per.items()})
        line = "attack mean IoU: " + ", ".join(f"{k} {v:.4f}" for k, v in iou.items())
        return Section({"attack": report}, {f"eval/attack/{k}": v for k, v in iou.items()}, [line])


class Overlays(Protocol):
    """Overlay PNGs of the first images: image, box prompts, box prediction, ground truth."""

    def __init__(self, num_overlays: int) -> None:
        self.num_overlays = num_overlays
        self.cases: list[dict[str, Any]] = []

    def update(self, batch: EvalBatch) -> None:
        if "images" not in batch.batch or len(self.cases) >= self.num_overlays:
            return
        box_pred = batch.prompted.get("box", batch.prompted[next(iter(batch.prompted))]) if batch.prompted else None
        boxes = batch.boxes()[2] if batch.num_objects else torch.zeros(0, 4)
        for b, image_id in enumerate(batch.batch["ids"]):
            if len(self.cases) >= self.num_overlays:
                break
            image, gt, sel = batch.image_crops(b)
            h, w = image.shape[-2:]
            pred = box_pred[sel, :h, :w].cpu() if box_pred is not None else None
            self.cases.append({"id": image_id, "image": image, "pred": pred, "gt": gt, "boxes": boxes[sel].cpu()})

    def compute(self, run_dir: Path) -> Section | None:
        if not self.cases:
            return None
        paths = save_overlays(self.cases, run_dir / "overlays", max_cases=len(self.cases))
        return Section({"overlays": [str(p) for p in paths]})
