"""`sam-train convert source_kind=... source=... out_dir=... [reader.key=value ...]` (configs/convert.yaml):
COCO / folders / medical volumes -> webdataset shards (`sam_train.data.convert`)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sam_train.data.convert import convert
from sam_train.errors import SamTrainError


def main(cfg: DictConfig) -> list[Path]:
    if not Path(cfg.source).exists():
        raise SamTrainError(f"source={cfg.source}: no such file or directory")
    reader = OmegaConf.to_container(cfg.reader, resolve=True) or {}
    try:
        return convert(
            cfg.source_kind, cfg.source, cfg.out_dir, shard_size=cfg.shard_size, max_bytes=cfg.max_bytes,
            image_format=cfg.image_format, on_error=cfg.on_error, **reader,
        )
    except (ValueError, TypeError) as exc:
        raise SamTrainError(str(exc)) from exc
