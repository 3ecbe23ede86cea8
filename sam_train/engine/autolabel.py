"""`sam-train autolabel`: the fully automatic (and semi-automatic) stage of the data engine.

The automatic mask generator prompts every image with a point grid and keeps confident (predicted
IoU), stable (stability score) masks after box NMS (SAM paper defaults: 32 x 32 points, 0.88, 0.95,
0.7); then tiny masks, near-whole-image masks and near-duplicate masks (mask IoU) are dropped. Images
that already have masks get only proposals that do not overlap them (`merge_proposals`). Results go
to SA-1B-style shards (`sam_train.engine.shards`) plus `stats.json` with per-image mask counts and
score histograms.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from sam_train.data.image_io import IMAGE_SUFFIXES, read_image
from sam_train.data.rle import encode_masks
from sam_train.data.sample import DataError
from sam_train.engine.merge import Rle, dedup, match_scores, merge_proposals
from sam_train.engine.shards import labelled_record, write_records
from sam_train.inference.amg import AutomaticMaskGenerator
from sam_train.models.sam import Sam

log = logging.getLogger(__name__)
Existing = Literal["merge", "ignore", "evaluate"]
HIST_BINS = np.linspace(0.0, 1.0, 11)


def iter_images(source: str | Path | Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Images to label as dicts {"image": uint8 [3,H,W], "id", "source", ["masks": bool [N,H,W]]}.

    `source`: a folder of images (png/jpg/tif, sorted), a shard folder / .tar / brace pattern (their
    masks come along), or any iterable of sample dicts (e.g. an untransformed dataset).
    """
    if not isinstance(source, str | Path):
        if hasattr(source, "iter_samples"):  # SampleDataset: every readable sample once, untransformed
            yield from source.iter_samples()
        elif hasattr(source, "__len__") and hasattr(source, "__getitem__"):
            yield from (source[i] for i in range(len(source)))
        else:
            yield from source
        return
    path = Path(source)
    is_shards = str(source).endswith(".tar") or "{" in str(source) or (path.is_dir() and (
        (path / "index.json").is_file() or any(path.glob("*.tar"))))
    if is_shards:
        from sam_train.data.webdataset import ShardDataset

        yield from ShardDataset(source, shuffle_buffer=0, on_error="skip")
        return
    if not path.is_dir():
        raise DataError(f"{path}: not found (expected a folder of images or of webdataset shards)")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) and no shards found")
    for f in files:
        yield {"image": read_image(f), "id": f.stem, "source": str(f)}


@dataclass
class ImageLabels:
    """Masks of one image: existing ones first (model_made False), then the model's."""

    rles: list[Rle]
    extras: list[dict[str, Any]]
    num_existing: int
    num_proposed: int  # masks the generator returned before the engine's own filters
    scores: dict[str, float] | None = None  # recall / precision vs known masks (existing="evaluate")


class AutoLabeler:
    """Automatic mask generation + the data engine's filters for one image at a time.

    Args:
        model: a `Sam` (put in eval mode here).
        min_area: drop masks with fewer pixels (tiny masks).
        max_area_fraction: drop masks covering more than this fraction of the image (background).
        dedup_iou: drop masks whose mask IoU with a better-scored kept one exceeds this.
        max_overlap: semi-automatic merge: largest fraction of a proposal that may lie on existing masks.
        existing: what to do with masks an image already has: "merge" (keep them, add non-overlapping
            proposals), "ignore" (fully automatic) or "evaluate" (hidden known objects: only scored).
        **generator: keyword arguments of `AutomaticMaskGenerator` (points_per_side, points_per_batch,
            pred_iou_thresh, stability_score_thresh, box_nms_thresh, crop_n_layers, min_mask_region_area,
            ...; its defaults are the paper's). Its output_mode is always "coco_rle" here.
    """

    def __init__(
        self,
        model: Sam,
        *,
        min_area: int = 16,
        max_area_fraction: float = 0.95,
        dedup_iou: float = 0.8,
        max_overlap: float = 0.1,
        existing: Existing = "merge",
        **generator: Any,
    ) -> None:
        if existing not in ("merge", "ignore", "evaluate"):
            raise ValueError(f"existing must be 'merge', 'ignore' or 'evaluate', got {existing!r}")
        if "output_mode" in generator:
            raise ValueError("AutoLabeler: output_mode is fixed to 'coco_rle' (the shards store RLE); do not pass it")
        self.amg = AutomaticMaskGenerator(model.eval(), **generator, output_mode="coco_rle")
        self.min_area = min_area
        self.max_area_fraction = max_area_fraction
        self.dedup_iou = dedup_iou
        self.max_overlap = max_overlap
        self.existing = existing

    def propose(self, image: torch.Tensor) -> tuple[list[dict[str, Any]], int]:
        """AMG records of an image that pass the area and near-duplicate filters (best first), and
        the number the generator returned."""
        records = self.amg.generate(image)
        h, w = int(image.shape[1]), int(image.shape[2])
        kept = [r for r in records if self.min_area <= r["area"] <= self.max_area_fraction * h * w]
        scores = [r["predicted_iou"] * r["stability_score"] for r in kept]
        order = dedup([r["segmentation"] for r in kept], scores, iou_thresh=self.dedup_iou)
        return [kept[i] for i in order], len(records)

    def label(self, item: dict[str, Any]) -> ImageLabels:
        """Masks for one image dict (see `iter_images`)."""
        image = item["image"]
        records, n_generated = self.propose(image)
        rles = [r["segmentation"] for r in records]
        extras = [
            {"predicted_iou": r["predicted_iou"], "stability_score": r["stability_score"],
             "point_coords": r["point_coords"], "crop_box": r["crop_box"], "model_made": True}
            for r in records
        ]
        known = item.get("masks")
        known_rles = encode_masks(known) if known is not None and len(known) else []
        if self.existing == "evaluate":
            scores = match_scores(rles, known_rles) if known is not None else None
            return ImageLabels(rles, extras, 0, n_generated, scores)
        if self.existing == "ignore" or not known_rles:
            return ImageLabels(rles, extras, 0, n_generated)
        merged = merge_proposals(known_rles, rles, [r["predicted_iou"] for r in records], max_overlap=self.max_overlap,
                                 min_area=self.min_area)
        human = [{"model_made": False} for _ in known_rles]
        return ImageLabels(merged.rles, human + [extras[i] for i in merged.accepted], len(known_rles), n_generated)


@dataclass
class AutolabelReport:
    """Per-image counts and score histograms of an autolabel run (what `stats.json` holds)."""

    per_image: dict[str, dict[str, Any]] = field(default_factory=dict)
    predicted_iou: list[float] = field(default_factory=list)
    stability_score: list[float] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)

    def add(self, image_id: str, labels: ImageLabels) -> None:
        made = [e for e in labels.extras if e.get("model_made")]
        entry: dict[str, Any] = {"masks": len(labels.rles), "existing": labels.num_existing, "model_made": len(made),
                                 "generated": labels.num_proposed}
        if labels.scores is not None:
            entry["vs_known"] = labels.scores
        self.per_image[image_id] = entry
        self.predicted_iou += [float(e["predicted_iou"]) for e in made]
        self.stability_score += [float(e["stability_score"]) for e in made]

    def summary(self) -> dict[str, Any]:
        counts = np.array([v["model_made"] for v in self.per_image.values()] or [0])
        out: dict[str, Any] = {
            "images": len(self.per_image),
            "images_without_masks": int(sum(v["masks"] == 0 for v in self.per_image.values())),
            "model_masks": int(counts.sum()),
            "model_masks_per_image": {"mean": float(counts.mean()), "min": int(counts.min()), "max": int(counts.max())},
            "histograms": {
                "bins": HIST_BINS.tolist(),
                # predicted IoU can exceed 1 (a regression head): clipped into the last bin
                "predicted_iou": np.histogram(np.clip(self.predicted_iou, 0, 1), HIST_BINS)[0].tolist(),
                "stability_score": np.histogram(np.clip(self.stability_score, 0, 1), HIST_BINS)[0].tolist(),
                "masks_per_image": np.bincount(counts).tolist(),
            },
        }
        scored = [v["vs_known"] for v in self.per_image.values() if "vs_known" in v]
        if scored:
            tp, n_pred, n_gt = (sum(s[k] for s in scored) for k in ("tp", "num_pred", "num_gt"))
            out["vs_known"] = {"recall": tp / n_gt if n_gt else float("nan"),
                               "precision": tp / n_pred if n_pred else float("nan"), "iou_thresh": 0.5}
        return out

    def format(self) -> str:
        s = self.summary()
        lines = [f"autolabel: {s['model_masks']} model masks on {s['images']} images "
                 f"({s['images_without_masks']} without any mask); per image mean "
                 f"{s['model_masks_per_image']['mean']:.2f} min {s['model_masks_per_image']['min']} "
                 f"max {s['model_masks_per_image']['max']}"]
        if "vs_known" in s:
            lines.append(f"vs known objects (IoU>=0.5): recall {s['vs_known']['recall']:.3f} "
                         f"precision {s['vs_known']['precision']:.3f}")
        per_image = s["histograms"]["masks_per_image"]
        lines.append("model masks per image: " + ", ".join(f"{k}: {n} images" for k, n in enumerate(per_image) if n))
        for name in ("predicted_iou", "stability_score"):
            hist = s["histograms"][name]
            top = max(hist) or 1
            lines.append(f"{name} histogram:")
            lines += [f"  [{lo:.1f}, {hi:.1f}{']' if hi == 1 else ')'} {n:6d} {'#' * round(30 * n / top)}"
                      for lo, hi, n in zip(HIST_BINS[:-1], HIST_BINS[1:], hist, strict=True)]
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"summary": self.summary(), "per_image": self.per_image, "shards": self.shards},
                                   indent=1))
        return path


def autolabel(
    labeler: AutoLabeler,
    images: str | Path | Iterable[dict[str, Any]],
    out_dir: str | Path,
    *,
    image_format: str = "png",
    max_samples_per_shard: int = 1000,
    progress: bool = True,
    allow_empty: bool = False,
) -> AutolabelReport:
    """Label every image of `images` (see `iter_images`) into `out_dir` shards + `out_dir/stats.json`.

    Images left without any mask are counted but not written (the shard reader needs >= 1 object).
    If no image got a mask: DataError, or with `allow_empty` a report without shards.
    Returns the report (also saved).
    """
    report = AutolabelReport()

    def records() -> Iterator[dict[str, Any]]:
        for n, item in enumerate(tqdm(iter_images(images), desc="autolabel", unit="image", disable=not progress)):
            image_id = str(item.get("id", n))
            labels = labeler.label(item)
            report.add(image_id, labels)
            if labels.rles:
                info = {k: item[k] for k in ("case_id", "slice_index", "spacing", "axis") if k in item}
                yield labelled_record(item["image"], labels.rles, labels.extras, key=f"{n:09d}", id=image_id,
                                      source=str(item.get("source", image_id)), image_format=image_format, info=info)

    try:
        report.shards = [str(p) for p in write_records(records(), out_dir, max_samples_per_shard=max_samples_per_shard)]
    except DataError:
        if not allow_empty:
            raise
        log.warning("autolabel: no image of %s got a mask; no shards written", images)
    report.save(Path(out_dir) / "stats.json")
    return report


__all__ = ["AutoLabeler", "AutolabelReport", "ImageLabels", "autolabel", "iter_images"]
