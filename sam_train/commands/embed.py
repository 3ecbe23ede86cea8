"""`sam-train embed [model=...] [data=...] out_dir=...` (configs/embed.yaml): every split the data config
defines (train / val / test) encoded once into `out_dir/<split>/` (`sam_train.embed.embed_dataset`)."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from sam_train.commands.build import build_model, checkpoint_of, device
from sam_train.data.embeddings import storage_dtype
from sam_train.embed import PRECISIONS, SPLITS, embed_dataset
from sam_train.errors import SamTrainError


def main(cfg: DictConfig) -> dict[str, list[Path]]:
    torch.manual_seed(cfg.seed)  # random-init models (tests, demos) match `fit` with the same seed
    try:
        storage_dtype(cfg.dtype)
    except ValueError as exc:
        raise SamTrainError(f"dtype={cfg.dtype}: {exc}") from exc
    if cfg.precision not in PRECISIONS:
        raise SamTrainError(f"precision={cfg.precision}: expected one of {PRECISIONS}")
    model = build_model(cfg).to(device(cfg.device))
    datamodule = instantiate(cfg.data)
    info = {"name": cfg.model.get("name"), "checkpoint": checkpoint_of(cfg)}
    written: dict[str, list[Path]] = {}
    for split in cfg.splits:
        if split not in SPLITS:
            raise SamTrainError(f"splits: unknown split {split!r}; expected some of {SPLITS}")
        dataset = getattr(datamodule, split, None)
        if dataset is None:
            continue
        written[split] = embed_dataset(
            model, dataset, Path(cfg.out_dir) / split, batch_size=cfg.batch_size, shard_size=cfg.shard_size,
            dtype=cfg.dtype, precision=cfg.precision, num_workers=cfg.num_workers, model_info=info,
            progress=cfg.progress,
        )
    if not written:
        raise SamTrainError(f"embed: the data config defines none of the splits {list(cfg.splits)}")
    return written
