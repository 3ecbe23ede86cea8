"""`sam-train eval` and the evaluation at the end of `sam-train fit`: one pass over the val set.

Each val batch is encoded once; its embeddings feed every protocol the options enable:
- prompted Dice / IoU per (case, class) for box / point / filled-box prompts (`eval.prompted`);
- the interactive click protocol (IoU after 1..K clicks, NoC@85/90, `iou_vs_clicks.png`) and the
  SAM-Med2D box / 1 / 3 / 5-point Dice (`eval.clicks`), scored at the model-input resolution;
- box predictions at the original resolution: per-case label volumes for medical slices (NIfTI with
  the image's geometry, Dice / IoU / NSD / HD95 per class via `eval.evaluate.evaluate_predictions`),
  PNG label images or COCO RLE json for 2D data;
- overlays of the first images, and the encoder attack of `eval.attack` on the first images.
Everything lands in `<run_dir>/metrics.json` and a printed table.

Options (configs/evaluate/default.yaml): modes, max_batches, num_overlays, device, seed, clicks.*,
sam_med2d.*, volumes.*, predictions.*, attack.*.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sam_train.errors import SamTrainError
from sam_train.eval.clicks import click_protocol, number_of_clicks, plot_iou_curve, sam_med2d_protocol
from sam_train.eval.metrics import summarize
from sam_train.eval.objects import ObjectScores, box_then_clicks, format_object_table
from sam_train.eval.overlays import _file_name as file_name
from sam_train.eval.overlays import save_overlays
from sam_train.eval.prompted import MODES, PromptedEvaluator, box_prompts, to_device, valid_region
from sam_train.eval.report import format_table, write_metrics_json
from sam_train.eval.saving import masks_to_label_map, save_coco_rle, save_png_labels
from sam_train.eval.volumes import VolumeCollector
from sam_train.models.sam import Sam

log = logging.getLogger(__name__)


def _opts(settings: Mapping | DictConfig | None) -> dict[str, Any]:
    """Evaluation options as plain containers (missing sections read as disabled / defaults)."""
    if settings is None:
        return {}
    return OmegaConf.to_container(settings, resolve=True) if isinstance(settings, DictConfig) else dict(settings)


def pick_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def click_predict_fn(model: Sam, embeddings: torch.Tensor, image_ids: torch.Tensor, valid: torch.Tensor):
    """`predict_fn` of `eval.clicks` on one batch: prompts -> logits [M, S, S] (padding forced negative).

    A lone click takes the multimask output SAM rates best (the point is ambiguous); with more prompts or
    a previous mask, the single-mask token. A padding point is appended when there is no box, as the
    official predictor does.
    """
    s, dev = model.img_size, embeddings.device

    def predict(points: torch.Tensor, labels: torch.Tensor, prev: torch.Tensor | None):
        pts, lab = points.to(dev), labels.to(dev)
        if not (lab >= 2).any():
            pts = torch.cat([pts, torch.zeros_like(pts[:, :1])], dim=1)
            lab = torch.cat([lab, torch.full_like(lab[:, :1], -1)], dim=1)
        low, iou = model.decode(embeddings, image_ids, pts, lab, mask_inputs=prev)
        single_click = points.shape[1] == 1 and prev is None and not (labels >= 2).any()
        best = iou[:, 1:].argmax(1) + 1 if single_click else torch.zeros(len(iou), dtype=torch.long, device=dev)
        chosen = low[torch.arange(len(best), device=dev), best][:, None]
        logits = F.interpolate(chosen, (s, s), mode="bilinear", align_corners=False)[:, 0]
        return logits.masked_fill(~valid, -1e4).cpu(), chosen

    return predict


class Evaluation:
    """Accumulates every enabled protocol over val batches; `finish` writes the results."""

    def __init__(self, model: Sam, opts: Mapping[str, Any], *, dataset: Any = None, initial: Sam | None = None) -> None:
        self.model, self.opts = model, opts
        self.prompted = PromptedEvaluator(opts.get("modes", MODES))
        self.clicks: list[torch.Tensor] = []
        self.med2d: dict[str, list[torch.Tensor]] = defaultdict(list)
        volumes = self.section("volumes")
        self.volumes = VolumeCollector.for_dataset(dataset) if volumes.get("enabled", False) else None
        self.pred_format = self.section("predictions").get("format")
        if self.pred_format not in (None, "png", "coco"):
            raise SamTrainError(f"predictions.format={self.pred_format!r}: expected png, coco or null")
        self.coco: list[tuple[str, torch.Tensor, list[int]]] = []
        self.overlays: list[dict[str, Any]] = []
        self.attack_samples: list[dict[str, torch.Tensor]] = []
        self.num_images = self.num_objects = 0
        self.dataset = dataset
        self.names = label_names(dataset)
        objects = self.section("objects")
        self.objects = ObjectScores(clicks=tuple(objects.get("clicks", (1, 3, 5)))) if objects.get("enabled") else None
        self.initial = initial.eval() if initial is not None and self.objects is not None else None
        self.initial_objects = ObjectScores(clicks=self.objects.clicks) if self.initial is not None else None

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.opts.get(name) or {})

    @torch.no_grad()
    def update(self, batch: dict[str, Any], run_dir: Path) -> None:
        model = self.model
        batch = to_device(batch, model.device)
        if "embeddings" not in batch:
            batch["embeddings"] = model.encode(model.preprocess(batch["images"]))
        self.num_images += len(batch["ids"])
        self.num_objects += int(batch["masks"].shape[0])
        preds = self.prompted.update(model, batch)
        gt, ids = batch["masks"], batch["image_ids"]
        keep = gt.flatten(1).any(1)
        if keep.any():
            valid = valid_region(batch)[keep]
            predict = click_predict_fn(model, batch["embeddings"], ids[keep], valid)
            clicks, med2d = self.section("clicks"), self.section("sam_med2d")
            if clicks.get("enabled"):
                out = click_protocol(
                    predict,
                    gt[keep].cpu(),
                    max_clicks=int(clicks.get("max_clicks", 20)),
                    iou_thresholds=tuple(clicks.get("iou_thresholds", (0.85, 0.9))),
                )
                self.clicks.append(out["iou_per_click"])
            if med2d.get("enabled"):
                out = sam_med2d_protocol(
                    predict, gt[keep].cpu(), point_counts=tuple(med2d.get("point_counts", (1, 3, 5)))
                )
                for k, v in out["dice_per_object"].items():
                    self.med2d[k].append(v)
        if self.objects is not None:
            self._score_objects(batch)
        if self.volumes is not None or self.pred_format:
            self._original_size_predictions(batch, run_dir)
        self._keep_images(batch, preds.get("box", preds[next(iter(preds))]) if preds else None)

    def _native_objects(self, batch: dict[str, Any], b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ground-truth masks bool [N, H, W] at the native size + class ids of image b of the batch: the
        val set's untransformed sample (the val loader is sequential), or the batch's masks cropped to
        the resized content when the data set cannot give it."""
        index = self.num_images - len(batch["ids"]) + b
        load = getattr(self.dataset, "try_load", None)
        raw = load(index) if load is not None and index < len(self.dataset) else None
        size = tuple(batch["original_sizes"][b].tolist())
        if raw is not None and str(raw.get("id")) == str(batch["ids"][b]) and tuple(raw["masks"].shape[-2:]) == size:
            return raw["masks"], raw["class_ids"]
        sel = (batch["image_ids"] == b).nonzero().flatten()
        h, w = batch["input_sizes"][b].tolist()
        return batch["masks"][sel, :h, :w].cpu(), batch["class_ids"][sel].cpu()

    def _score_objects(self, batch: dict[str, Any]) -> None:
        min_area = int(self.section("objects").get("min_area", 1))
        for b in range(len(batch["ids"])):
            masks, class_ids = self._native_objects(batch, b)
            keep = masks.flatten(1).sum(1) >= max(min_area, 1)
            if not keep.any():
                continue
            case = str(batch["meta"][b].get("case_id", batch["ids"][b]))
            for model, acc in ((self.model, self.objects), (self.initial, self.initial_objects)):
                if model is not None:
                    scores = box_then_clicks(model, batch["embeddings"][b], masks[keep], clicks=acc.clicks)
                    acc.add(scores, class_ids[keep].tolist(), case)

    def _original_size_predictions(self, batch: dict[str, Any], run_dir: Path) -> None:
        """Box predictions at each image's original size -> volume slices / PNG / COCO results."""
        model, gt = self.model, batch["masks"]
        coords, labels, _ = box_prompts(gt) if gt.shape[0] else (None, None, None)
        low = model.decode(batch["embeddings"], batch["image_ids"], coords, labels)[0][:, :1] if gt.shape[0] else None
        for b, image_id in enumerate(batch["ids"]):
            sel = (batch["image_ids"] == b).nonzero().flatten()
            size = tuple(batch["original_sizes"][b].tolist())
            if len(sel):
                logits = model.postprocess_masks(low[sel], tuple(batch["input_sizes"][b].tolist()), size)
                masks = (logits[:, 0] > model.mask_threshold).cpu()
            else:
                masks = torch.zeros(0, *size, dtype=torch.bool)
            classes = batch["class_ids"][sel].cpu()
            meta = batch["meta"][b]
            if self.volumes is not None and "case_id" in meta:
                self.volumes.add(meta, masks, classes)
            elif self.pred_format == "png":
                instance = masks_to_label_map(masks, torch.arange(1, len(masks) + 1))
                save_png_labels(instance, run_dir / "predictions" / f"{file_name(image_id)}.png")
            elif self.pred_format == "coco":
                self.coco.append((image_id, masks, [int(c) if c >= 0 else 1 for c in classes.tolist()]))

    def _keep_images(self, batch: dict[str, Any], box_pred: torch.Tensor | None) -> None:
        """The first images for overlays and for the attack (content crop, model-input resolution)."""
        n_overlay = int(self.opts.get("num_overlays", 0) or 0)
        attack = self.section("attack")
        n_attack = int(attack.get("max_images", 8)) if attack.get("eps") else 0
        if "images" not in batch or (len(self.overlays) >= n_overlay and len(self.attack_samples) >= n_attack):
            return
        _, _, boxes = box_prompts(batch["masks"]) if batch["masks"].shape[0] else (None, None, torch.zeros(0, 4))
        for b, image_id in enumerate(batch["ids"]):
            h, w = batch["input_sizes"][b].tolist()
            sel = (batch["image_ids"] == b).nonzero().flatten()
            image = batch["images"][b, :, :h, :w].cpu()
            gt = batch["masks"][sel, :h, :w].cpu()
            if len(self.overlays) < n_overlay:
                pred = box_pred[sel, :h, :w].cpu() if box_pred is not None else None
                self.overlays.append(
                    {"id": image_id, "image": image, "pred": pred, "gt": gt, "boxes": boxes[sel].cpu()}
                )
            if len(self.attack_samples) < n_attack and gt.flatten(1).any(1).any():
                self.attack_samples.append({"image": image, "masks": gt, "id": image_id})

    def finish(self, run_dir: Path, *, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Compute summaries, write metrics.json / plots / overlays / predictions, print tables."""
        result: dict[str, Any] = {**(extra or {}), "num_images": self.num_images, "num_objects": self.num_objects}
        flat: dict[str, float] = {}
        prompted = self.prompted.result()
        result["prompted"] = prompted
        for mode, r in prompted.items():
            flat[f"eval/{mode}/dice"], flat[f"eval/{mode}/iou"] = r["dice"], r["iou"]
        summary = summarize(_per_case_table(prompted))
        summary["per_class"] = {
            self.names.get(int(k.split("_")[-1]), k): v
            for k, v in sorted(summary["per_class"].items(), key=lambda kv: int(kv[0].split("_")[-1]))
        }
        result["prompted_summary"] = summary
        tables = [
            "prompted (Dice / IoU per case and class; mean ± std over cases):",
            format_table(result["prompted_summary"]),
        ]
        if self.objects is not None and self.objects.class_ids:
            objects = self.objects.summary(self.names)
            result["objects"] = {**objects, "clicks": list(self.objects.clicks)}
            flat.update({f"eval/objects/{k}/dice": v for k, v in objects["overall"].items() if k != "n"})
            tables += [
                "held-out objects (Dice per object at the native resolution: tight box, then correction clicks "
                "on top of it; filled box = the box itself):",
                format_object_table(objects, self.objects.clicks),
            ]
            if self.initial_objects is not None:
                start = self.initial_objects.summary(self.names)
                result["objects"]["initial"] = start
                flat.update({f"eval/objects_initial/{k}/dice": v for k, v in start["overall"].items() if k != "n"})
                last = self.objects.clicks[-1] if self.objects.clicks else None
                line = (f"initial weights (before fine-tuning), same objects: box {start['overall']['box']:.4f}"
                        + (f", +{last} clicks {start['overall'][f'clicks_{last}']:.4f}" if last else "")
                        + f"; fine-tuned: box {objects['overall']['box']:.4f}"
                        + (f", +{last} clicks {objects['overall'][f'clicks_{last}']:.4f}" if last else "")
                        + f"; filled box {objects['overall']['filled_box']:.4f}")
                tables.append(line)
        if self.clicks:
            result["clicks"] = self._click_summary(run_dir, flat)
            tables.append(
                "clicks: " + ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in flat.items() if "/clicks/" in k)
            )
        if self.med2d:
            dice = {k: float(torch.cat(v).mean()) for k, v in self.med2d.items()}
            result["sam_med2d"] = {"dice": dice, "num_objects": len(torch.cat(next(iter(self.med2d.values()))))}
            flat.update({f"eval/sam_med2d/{k}/dice": v for k, v in dice.items()})
            tables.append("SAM-Med2D Dice: " + ", ".join(f"{k} {v:.4f}" for k, v in dice.items()))
        if self.volumes is not None and self.volumes.slices:
            vol = self.volumes.finish(run_dir, self.section("volumes"))
            result["volumes"] = vol
            for metric, stat in vol["summary"]["overall"].items():
                flat[f"eval/volume/{metric}"] = stat["mean"]
            tables += ["3D per case (box prompts on every slice):", format_table(vol["summary"])]
        if self.coco:
            save_coco_rle(
                [m for _, m, _ in self.coco],
                [i for i, _, _ in self.coco],
                run_dir / "predictions" / "coco_results.json",
                category_ids=[c for _, _, c in self.coco],
            )
        attack = self.section("attack")
        if attack.get("eps") and self.attack_samples:
            result["attack"] = self._attack(attack, flat)
            tables.append(
                "attack mean IoU: "
                + ", ".join(f"{k[12:]} {v:.4f}" for k, v in flat.items() if k.startswith("eval/attack/"))
            )
        if self.overlays:
            result["overlays"] = [
                str(p) for p in save_overlays(self.overlays, run_dir / "overlays", max_cases=len(self.overlays))
            ]
        result["summary"] = flat
        write_metrics_json(result, run_dir / "metrics.json")
        text = "\n".join(tables)
        (run_dir / "metrics_table.txt").write_text(text + "\n")
        print(text)
        return result

    def _click_summary(self, run_dir: Path, flat: dict[str, float]) -> dict[str, Any]:
        clicks = self.section("clicks")
        ious = torch.cat(self.clicks)
        curve = ious.mean(0).tolist()
        out: dict[str, Any] = {"mean_iou_curve": curve, "max_clicks": len(curve), "num_objects": len(ious)}
        for thr in clicks.get("iou_thresholds", (0.85, 0.9)):
            key = f"noc{round(thr * 100)}"
            out[key] = float(number_of_clicks(ious, thr).float().mean())
            flat[f"eval/clicks/{key}"] = out[key]
        for k in sorted({1, 3, 5, len(curve)} & set(range(1, len(curve) + 1))):
            flat[f"eval/clicks/iou@{k}"] = curve[k - 1]
        out["plot"] = str(plot_iou_curve({"simulated clicks": curve}, run_dir / "iou_vs_clicks.png"))
        return out

    def _attack(self, attack: Mapping[str, Any], flat: dict[str, float]) -> dict[str, Any]:
        from sam_train.eval.attack import robustness_report

        generator = torch.Generator().manual_seed(int(self.opts.get("seed", 0) or 0))
        report = robustness_report(
            self.model,
            self.attack_samples,
            [float(e) for e in attack["eps"]],
            generator=generator,
            prompts=tuple(attack.get("prompts", ("point", "box"))),
            steps=int(attack.get("steps", 10)),
        )
        flat.update({f"eval/attack/clean/{p}/iou": v for p, v in report["clean"].items()})
        for eps, per in report["attacked"].items():
            flat.update({f"eval/attack/eps={eps:g}/{p}/iou": v for p, v in per.items()})
        return report


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


def run_evaluation(
    model: Sam,
    batches,
    opts: Mapping[str, Any],
    run_dir: Path,
    *,
    dataset: Any = None,
    extra: Mapping[str, Any] | None = None,
    initial: Sam | None = None,
) -> dict[str, Any]:
    """Evaluate `model` on `batches` (collated val batches) with the given options; see the module docstring.
    `initial`: the weights training started from, scored by the object protocol on the same embeddings
    (its image encoder must equal the model's: a frozen-encoder fine-tune)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        evaluation = Evaluation(model, opts, dataset=dataset, initial=initial)
        max_batches = opts.get("max_batches")
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= int(max_batches):
                break
            evaluation.update(batch, run_dir)
        return evaluation.finish(run_dir, extra=extra)
    finally:
        model.train(was_training)


def _val_set(datamodule: Any) -> tuple[Any, Any]:
    dataset = getattr(datamodule, "val", None)
    if dataset is None:
        raise SamTrainError("the data config has no val split to evaluate on (data.val is null)")
    return dataset, datamodule.val_dataloader()


def evaluate_after_fit(cfg: DictConfig, model: Sam, datamodule: Any, run_dir: Path) -> dict[str, float]:
    """The end of `sam-train fit` when `evaluate` is set: writes <run_dir>/metrics.json and overlays/;
    returns the flat summary ({"eval/box/dice": ..., "eval/filled_box/dice": ...})."""
    opts = {"seed": cfg.get("seed", 0), **_opts(cfg.evaluate)}
    model = model.to(pick_device(opts.get("device")))
    dataset, loader = _val_set(datamodule)
    initial = initial_model(cfg, model) if (opts.get("objects") or {}).get("compare_initial") else None
    result = run_evaluation(model, loader, opts, Path(run_dir), dataset=dataset, initial=initial)
    return {k: float(v) for k, v in result["summary"].items() if v is not None and math.isfinite(v)}


def initial_model(cfg: DictConfig, model: Sam) -> Sam | None:
    """The model the fit started from (cfg.model as configured), when its image encoder equals the trained
    model's (frozen-encoder fine-tuning: both share the val embeddings); None otherwise."""
    initial = instantiate(cfg.model).to(model.device)
    trained = model.image_encoder.state_dict()
    for k, v in initial.image_encoder.state_dict().items():
        if k not in trained or trained[k].shape != v.shape or not torch.equal(trained[k], v):
            log.info("evaluate.objects.compare_initial: the image encoder was trained; initial weights not scored")
            return None
    return initial


def load_eval_model(cfg: DictConfig) -> Sam:
    """cfg.model built, cfg.finetune applied (LoRA / adapters must exist to load their weights), then
    the weights of cfg.checkpoint (any layout `load_state_dict_any` reads, Lightning .ckpt included)."""
    from sam_train.models.checkpoint import load_sam_weights

    checkpoint = cfg.get("checkpoint")
    if not checkpoint and not cfg.model.get("checkpoint") and not cfg.model.get("pretrained"):
        raise SamTrainError("checkpoint=<path> is required (a fit run's .ckpt or a SAM checkpoint), "
                            "or a model with bundled weights (model=lite_medsam)")
    if checkpoint and not Path(checkpoint).exists():
        raise SamTrainError(f"checkpoint={checkpoint}: no such file")
    model = instantiate(cfg.model)
    if cfg.get("finetune") is not None:
        model = instantiate(cfg.finetune)(model)
    if checkpoint:
        fmt = load_sam_weights(model, checkpoint)
        log.info("loaded %s (%s)", checkpoint, fmt)
    return model


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """`sam-train eval`: metrics of cfg.checkpoint on cfg.data's val split, written to cfg.run_dir."""
    opts = _opts(cfg)
    model = load_eval_model(cfg).to(pick_device(opts.get("device")))  # checkpoint errors before any output
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    datamodule = instantiate(cfg.data, train=None)  # only the val split is read
    dataset, loader = _val_set(datamodule)
    extra = {"checkpoint": str(cfg.get("checkpoint") or cfg.model.get("checkpoint")
                               or f"{cfg.model.name} (bundled pretrained weights)")}
    result = run_evaluation(model, loader, opts, run_dir, dataset=dataset, extra=extra)
    log.info("metrics written to %s", run_dir / "metrics.json")
    return result


def export_onnx(cfg: DictConfig) -> Path:
    """`sam-train export onnx checkpoint=... out=...`: the checkpoint's prompt encoder + mask decoder as
    ONNX (`sam_train.export.onnx.export_decoder_onnx`); LoRA / adapters only touch the image encoder."""
    from sam_train.export.onnx import export_decoder_onnx

    model = load_eval_model(cfg)
    try:
        path = export_decoder_onnx(
            model,
            cfg.out,
            opset=int(cfg.opset),
            return_single_mask=bool(cfg.return_single_mask),
            dynamo=bool(cfg.dynamo),
        )
    except ValueError as exc:  # bad opset / exporter combination
        raise SamTrainError(str(exc)) from exc
    print(f"wrote {path}")
    return path
