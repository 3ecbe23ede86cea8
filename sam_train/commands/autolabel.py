"""`sam-train autolabel` (configs/autolabel.yaml): automatic masks for images / shards -> SA-1B-style shards
+ stats.json (`sam_train.engine.autolabel`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from sam_train.commands.build import inference_model
from sam_train.engine.autolabel import AutoLabeler, AutolabelReport, autolabel

log = logging.getLogger(__name__)


def main(cfg: DictConfig) -> AutolabelReport:
    torch.manual_seed(cfg.seed)
    model = inference_model(cfg)
    labeler = AutoLabeler(model, **cfg.generator, existing=cfg.existing)
    source = instantiate(cfg.source) if not isinstance(cfg.source, str) else cfg.source
    report = autolabel(labeler, source, cfg.out_dir, image_format=cfg.image_format,
                       max_samples_per_shard=cfg.shard_size)
    print(report.format())
    log.info("wrote %s and %s", ", ".join(report.shards), Path(cfg.out_dir) / "stats.json")
    return report
