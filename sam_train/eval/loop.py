"""The evaluation loop of `sam-train eval`, the end of `sam-train fit` and distill's held-out report.

Each val batch is encoded once; its embeddings (and its one box decode) feed every protocol the options
enable (`sam_train.eval.protocols`):
- prompted Dice / IoU per (case, class) for box / point / filled-box prompts;
- the interactive click protocol (IoU after 1..K clicks, NoC@85/90, `iou_vs_clicks.png`) and the
  SAM-Med2D box / 1 / 3 / 5-point Dice, scored at the model-input resolution;
- per object at the native resolution: box, then correction clicks (optionally also the initial weights);
- box predictions at the original resolution: per-case label volumes for medical slices (NIfTI with
  the image's geometry, Dice / IoU / NSD / HD95 per class via `eval.evaluate.evaluate_predictions`),
  PNG label images or COCO RLE json for 2D data;
- the encoder attack of `eval.attack` and overlays of the first images.
Everything lands in `<run_dir>/metrics.json` and a printed table (`eval.report.write_report`).
Options: `EvalConfig` (sam_train/eval/config.py; configs/evaluate/ mirrors its defaults).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from sam_train.errors import SamTrainError
from sam_train.eval.config import EvalConfig
from sam_train.eval.prompted import to_device
from sam_train.eval.protocols import (
    ClickCurve,
    EncoderAttack,
    EvalBatch,
    ObjectDice,
    Overlays,
    PromptedDice,
    Protocol,
    SamMed2dPoints,
    SavePredictions,
    Volumes,
    label_names,
)
from sam_train.eval.report import write_report
from sam_train.eval.volumes import VolumeCollector
from sam_train.models.sam import Sam


def first_changed_unit(encoder: torch.nn.Module, other: torch.nn.Module) -> int | None:
    """None when two image encoders of one architecture hold identical weights, else the first unit
    (`TinyViT.units`) whose weights differ: the units before it give both the same features (0 for an
    encoder without units)."""
    a, b = encoder.state_dict(), other.state_dict()
    if a.keys() != b.keys():
        return 0
    changed = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    if not changed:
        return None
    return min(encoder.unit_of(k) for k in changed) if hasattr(encoder, "unit_of") else 0


def build_protocols(
    model: Sam, config: EvalConfig, *, dataset: Any = None, initial: Sam | None = None
) -> list[Protocol]:
    """The protocols `config` enables, in the order metrics.json and the table report them."""
    names = label_names(dataset)
    protocols: list[Protocol] = [PromptedDice(config.modes, names)]
    if config.objects.enabled:
        protocols.append(ObjectDice(config.objects, names, dataset=dataset, initial=initial))
    if config.clicks.enabled:
        protocols.append(ClickCurve(config.clicks))
    if config.sam_med2d.enabled:
        protocols.append(SamMed2dPoints(config.sam_med2d))
    collector = VolumeCollector.for_dataset(dataset) if config.volumes.enabled else None
    if collector is not None:
        protocols.append(Volumes(config.volumes, collector))
    if config.predictions.format:
        protocols.append(SavePredictions(config.predictions, skip_volume_slices=collector is not None))
    if config.attack.eps:
        protocols.append(EncoderAttack(config.attack, model, seed=config.seed))
    if config.num_overlays:
        protocols.append(Overlays(int(config.num_overlays)))
    return protocols


class Evaluation:
    """Every enabled protocol over val batches: `update` per batch, `finish` writes the results."""

    def __init__(
        self,
        model: Sam,
        config: EvalConfig | Mapping[str, Any],
        *,
        dataset: Any = None,
        initial: Sam | None = None,
    ) -> None:
        self.model, self.config = model, EvalConfig.from_dict(config)
        self.protocols = build_protocols(model, self.config, dataset=dataset, initial=initial)
        self.initial = initial if any(getattr(p, "initial", None) is not None for p in self.protocols) else None
        # where the two encoders start to differ: the frozen front before it is run once for both
        self.front = None if self.initial is None else first_changed_unit(model.image_encoder, initial.image_encoder)
        self.num_images = self.num_objects = 0

    def embed(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's embeddings [B, C, h, w] (the caller's, or encoded here once) and, when the initial
        weights are scored, theirs (the same tensor for an unchanged encoder)."""
        model, initial, k = self.model, self.initial, self.front
        if initial is None or k is None:
            embeddings = model.batch_embeddings(batch)
            return embeddings, None if initial is None else embeddings
        if "images" not in batch:
            raise SamTrainError("evaluate.objects.compare_initial: scoring the initial weights of a trained image "
                                "encoder needs the val images, but the batches carry only embeddings")
        if k == 0:
            return model.batch_embeddings(batch), initial.batch_embeddings(batch)
        features = model.image_encoder.forward_until(model.preprocess(batch["images"]), k)
        return model.image_encoder.forward_from(features, k), initial.image_encoder.forward_from(features, k)

    @torch.no_grad()
    def update(self, batch: dict[str, Any], run_dir: Path) -> None:
        """One collated val batch (its `embeddings` when the caller encoded it already)."""
        model = self.model
        batch = to_device(batch, model.device)
        batch["embeddings"], initial_embeddings = self.embed(batch)
        shared = EvalBatch(model, batch, self.num_images, run_dir, initial_embeddings)
        self.num_images += shared.num_images
        self.num_objects += shared.num_objects
        for protocol in self.protocols:
            protocol.update(shared)

    def finish(self, run_dir: Path, *, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Compute every protocol, write metrics.json / plots / overlays / predictions, print the table."""
        head = {**(extra or {}), "num_images": self.num_images, "num_objects": self.num_objects}
        return write_report((p.compute(run_dir) for p in self.protocols), run_dir, head)


def run_evaluation(
    model: Sam,
    batches: Iterable[dict[str, Any]],
    config: EvalConfig | Mapping[str, Any],
    run_dir: Path,
    *,
    dataset: Any = None,
    extra: Mapping[str, Any] | None = None,
    initial: Sam | None = None,
) -> dict[str, Any]:
    """Evaluate `model` on `batches` (collated val batches) with the given options; see the module docstring.
    `initial`: the weights training started from, scored by the object protocol (on the same embeddings when
    its image encoder equals the model's, as after a frozen-encoder fine-tune)."""
    config = EvalConfig.from_dict(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        evaluation = Evaluation(model, config, dataset=dataset, initial=initial)
        for i, batch in enumerate(batches):
            if config.max_batches is not None and i >= int(config.max_batches):
                break
            evaluation.update(batch, run_dir)
        return evaluation.finish(run_dir, extra=extra)
    finally:
        model.train(was_training)
