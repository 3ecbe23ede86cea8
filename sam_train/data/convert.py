"""`sam-train convert`: COCO json, image/mask folders or medical volumes -> SA-1B-style shards."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from sam_train.data.sample import OnError, SampleDataset
from sam_train.data.webdataset import write_shards

log = logging.getLogger(__name__)
SourceKind = Literal["coco", "folders", "medical"]


def open_source(
    source_kind: SourceKind, source: str | Path, *, on_error: OnError = "raise", **kwargs: Any
) -> SampleDataset:
    """The reader of a source kind, untransformed.

    coco: source = annotation json, kwargs image_dir=...; folders: source = image folder, kwargs
    mask_dir=... (layout=...); medical: source = MSD / nnU-Net folder, kwargs as MedicalSliceDataset.
    """
    if source_kind == "coco":
        from sam_train.data.coco import CocoDataset

        if "image_dir" not in kwargs:
            raise ValueError("convert coco: image_dir=... is required (folder the json's file_name is relative to)")
        return CocoDataset(source, on_error=on_error, **kwargs)
    if source_kind == "folders":
        from sam_train.data.folders import FolderDataset

        if "mask_dir" not in kwargs:
            raise ValueError("convert folders: mask_dir=... is required")
        return FolderDataset(source, on_error=on_error, **kwargs)
    if source_kind == "medical":
        from sam_train.data.medical import MedicalSliceDataset

        return MedicalSliceDataset(source, on_error=on_error, **kwargs)
    raise ValueError(f"source_kind must be 'coco', 'folders' or 'medical', got {source_kind!r}")


def convert(
    source_kind: SourceKind,
    source: str | Path,
    out_dir: str | Path,
    *,
    shard_size: int = 1000,
    max_bytes: float = 1e9,
    image_format: str = "keep",
    on_error: OnError = "raise",
    progress: bool = True,
    **kwargs: Any,
) -> list[Path]:
    """Convert a data set into shards of at most `shard_size` samples / `max_bytes` bytes (+ index.json).

    Bad inputs raise (on_error="raise") or are logged, counted and reported at the end ("skip").
    Returns the written shard paths.
    """
    dataset = open_source(source_kind, source, on_error=on_error, **kwargs)
    shards = write_shards(
        dataset.iter_samples(), out_dir, max_samples_per_shard=shard_size, max_bytes=max_bytes,
        image_format=image_format, total=len(dataset), progress=progress,
    )
    summary = dataset.skips.summary()
    log.info("converted %s -> %d shards in %s (%s)", source, len(shards), out_dir, summary)
    if summary["skipped"]:
        log.warning("convert skipped %d bad samples: %s", summary["skipped"], summary["by_source"])
    return shards
