"""Data-engine shards: SA-1B-style webdataset shards whose per-mask records carry the model's scores,
and a map-style view of shards for training on a labelled set + autolabelled shards.

Each annotation has the fields of `sam_train.data.webdataset` (id, segmentation, bbox, area,
category_id) plus, as in SA-1B's json, `predicted_iou`, `stability_score`, `point_coords`,
`crop_box`, and `model_made` (False for human / pre-existing masks). `ShardDataset` reads them
(extra fields are ignored by the sample format).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from sam_train.data.sample import DataError, SampleDataset
from sam_train.data.webdataset import list_shards, record_to_sample, sample_to_record
from sam_train.engine.merge import Rle, from_rles

EXTRA_FIELDS = ("predicted_iou", "stability_score", "point_coords", "crop_box", "model_made")


def labelled_record(
    image: torch.Tensor,
    rles: list[Rle],
    extras: list[dict[str, Any]],
    *,
    key: str,
    id: str,
    source: str,
    image_format: str = "png",
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One image + its masks (RLEs) + per-mask extra fields -> webdataset record (SA-1B json)."""
    if len(rles) != len(extras):
        raise ValueError(f"{source}: {len(rles)} masks but {len(extras)} per-mask records")
    masks = from_rles(rles, (int(image.shape[1]), int(image.shape[2])))
    sample = {"image": image, "masks": masks, "id": id, "source": source, **(info or {})}
    record = sample_to_record(sample, key, image_format=image_format)
    meta = json.loads(record["json"])
    for ann, extra in zip(meta["annotations"], extras, strict=True):
        ann.update({k: extra[k] for k in EXTRA_FIELDS if k in extra})
    record["json"] = json.dumps(meta).encode()
    return record


def write_records(records: Iterable[dict[str, Any]], out_dir: str | Path, *, prefix: str = "autolabel",
                  max_samples_per_shard: int = 1000, max_bytes: float = 1e9) -> list[Path]:
    """Write webdataset records into `out_dir/{prefix}-000000.tar`, ... plus index.json (as write_shards)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=max_samples_per_shard, maxsize=max_bytes,
                         verbose=0) as writer:
        for record in records:
            writer.write(record)
            name = Path(writer.fname).name
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        (out / f"{prefix}-000000.tar").unlink(missing_ok=True)  # ShardWriter opens its first shard eagerly
        raise DataError(f"{out}: no image got a mask, nothing to write (lower the thresholds?)")
    index = {"shards": [{"file": k, "num_samples": v} for k, v in sorted(counts.items())],
             "num_samples": sum(counts.values())}
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return [out / k for k in sorted(counts)]


def read_records(urls: str | Path | list[str]) -> list[dict[str, Any]]:
    """All records of shards as {"__key__", "__url__", ext: bytes} (compressed: PNG/JPEG + RLE json)."""
    shards, _ = list_shards(urls)
    records: list[dict[str, Any]] = []
    for shard in shards:
        grouped: dict[str, dict[str, Any]] = {}
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.partition(".")
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    grouped.setdefault(key, {"__key__": key, "__url__": shard})[ext] = data
        except (tarfile.TarError, OSError) as exc:
            raise DataError(f"{shard}: unreadable tar shard (expected a complete tar archive): {exc}") from exc
        records.extend(grouped.values())
    return records


def annotations_of(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-mask annotation dicts of a record (with the extra fields)."""
    return json.loads(record["json"])["annotations"]


class ShardSamples(SampleDataset):
    """Map-style dataset over (small) shard sets: records stay compressed in memory, decoded on access.

    Lets a labelled map-style set and autolabelled shards be concatenated
    (`torch.utils.data.ConcatDataset`) and shuffled together.

    Args:
        urls: shard folder, brace pattern or list of shards (as ShardDataset).
        transform: usually a SamTransform.
        min_predicted_iou: keep model-made masks whose predicted_iou is at least this (human ones always).
    """

    def __init__(self, urls: str | Path | list[str], *, transform=None, min_predicted_iou: float = 0.0) -> None:
        super().__init__(transform=transform)
        self.records = read_records(urls)
        self.min_predicted_iou = min_predicted_iou
        if not self.records:
            raise DataError(f"{urls}: no samples in the shards")

    def __len__(self) -> int:
        return len(self.records)

    def source_of(self, index: int) -> str:
        r = self.records[index]
        return f"{r['__url__']}:{r['__key__']}"

    def load(self, index: int) -> dict[str, Any]:
        sample = record_to_sample(self.records[index])
        if self.min_predicted_iou > 0:
            keep = torch.tensor([not a.get("model_made", False) or a.get("predicted_iou", 1.0) >= self.min_predicted_iou
                                 for a in annotations_of(self.records[index])])
            if not keep.any():
                raise DataError(f"{self.source_of(index)}: no mask with predicted_iou >= {self.min_predicted_iou}")
            sample["masks"], sample["class_ids"] = sample["masks"][keep], sample["class_ids"][keep]
        return sample


def union_dataset(datasets: list[Any]) -> torch.utils.data.ConcatDataset:
    """Concatenate map-style datasets (a labelled set and `ShardSamples` of autolabelled shards)."""
    return torch.utils.data.ConcatDataset(list(datasets))
