"""SA-1B-style webdataset shards: writer and streaming reader.

A shard is a plain tar; each sample is `{key}.png|jpg` (the image) + `{key}.json`:

    {"image": {"id", "height", "width", "source", [case_id, slice_index, spacing, axis]},
     "annotations": [{"id", "segmentation": {"size": [H, W], "counts": str}, "bbox", "area", "category_id"}]}

`write_shards` also writes `index.json` ({"shards": [{"file", "num_samples"}], "num_samples"}) so the
reader knows the data set size without scanning it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from sam_train.data.image_io import decode_image_bytes, encode_image
from sam_train.data.rle import check_rle, decode_compressed_rles, encode_masks, rle_bbox_area
from sam_train.data.sample import DataError, OnError, SkipCounter, make_sample

log = logging.getLogger(__name__)
IMAGE_KEYS = ("png", "jpg", "jpeg")
MEDICAL_KEYS = ("case_id", "slice_index", "spacing", "axis")


IMAGE_FORMATS = ("keep", "png", "jpg", "jpeg")


def source_image_bytes(sample: dict[str, Any]) -> tuple[str, bytes] | None:
    """("jpg" | "png", file bytes) when the sample's source is an 8-bit RGB / grey JPEG or PNG file of the
    sample's size (its bytes decode to the sample image), else None."""
    path = Path(str(sample.get("source", "")))
    if path.suffix.lower() not in (".jpg", ".jpeg", ".png") or not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            fmt, mode, size = im.format, im.mode, im.size
    except OSError:
        return None
    h, w = sample["image"].shape[1:]
    if fmt not in ("JPEG", "PNG") or mode not in ("RGB", "L") or size != (w, h):
        return None
    return ("jpg" if fmt == "JPEG" else "png"), path.read_bytes()


def sample_to_record(sample: dict[str, Any], key: str, *, image_format: str = "keep") -> dict[str, Any]:
    """Sample dict -> webdataset record {"__key__", "png"|"jpg": bytes, "json": bytes}.

    image_format "keep" stores the source file's own bytes when it is an 8-bit JPEG / PNG (as SA-1B
    keeps its JPEGs: no second lossy compression, no size growth) and lossless PNG otherwise (medical
    slices, 16-bit or palette images); "png" / "jpg" always re-encode.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    masks = sample["masks"].numpy()
    class_ids = sample.get("class_ids")
    annotations = []
    for k, rle in enumerate(encode_masks(masks)):
        bbox, area = rle_bbox_area(rle)
        category = int(class_ids[k]) if class_ids is not None else -1
        annotations.append({"id": k, "segmentation": rle, "bbox": bbox, "area": area, "category_id": category})
    h, w = sample["image"].shape[1:]
    image_info = {"id": sample["id"], "height": int(h), "width": int(w), "source": sample["source"]}
    image_info.update({k: sample[k] for k in MEDICAL_KEYS if k in sample})
    record = {"__key__": key, "json": json.dumps({"image": image_info, "annotations": annotations}).encode()}
    kept = source_image_bytes(sample) if image_format == "keep" else None
    if kept is not None:
        record[kept[0]] = kept[1]
    else:
        fmt = "jpg" if image_format in ("jpg", "jpeg") else "png"
        record[fmt] = encode_image(sample["image"], fmt)
    return record


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | Path,
    *,
    max_samples_per_shard: int = 1000,
    max_bytes: float = 1e9,
    image_format: str = "keep",
    prefix: str = "shard",
    total: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write samples into `out_dir/{prefix}-000000.tar`, ... (a new shard once either limit is reached)
    plus `out_dir/index.json`. image_format: see `sample_to_record`. Returns the shards."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    n = 0
    with wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=max_samples_per_shard, maxsize=max_bytes,
                         verbose=0) as writer:
        for sample in tqdm(samples, total=total, desc=f"writing shards to {out}", unit="sample", disable=not progress):
            writer.write(sample_to_record(sample, f"{n:09d}", image_format=image_format))
            name = Path(writer.fname).name
            counts[name] = counts.get(name, 0) + 1
            n += 1
    if n == 0:
        (out / f"{prefix}-000000.tar").unlink(missing_ok=True)  # ShardWriter opens its first shard eagerly
        raise DataError(f"{out}: no samples to write (the source yielded none)")
    index = {"shards": [{"file": k, "num_samples": v} for k, v in sorted(counts.items())], "num_samples": n}
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return [out / k for k in sorted(counts)]


def record_to_sample(record: dict[str, Any]) -> dict[str, Any]:
    """Webdataset record (raw bytes) -> sample dict; DataError naming shard and key when malformed."""
    where = f"{record.get('__url__', '<shard>')} (sample {record.get('__key__')})"
    image_key = next((k for k in IMAGE_KEYS if k in record), None)
    if image_key is None or "json" not in record:
        raise DataError(f"{where}: incomplete sample, has {sorted(k for k in record if not k.startswith('__'))}, "
                        "expected an image (.png/.jpg) and a .json")
    try:
        meta = json.loads(record["json"])
        info, annotations = meta["image"], meta["annotations"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{where}: malformed .json (expected {{'image': ..., 'annotations': [...]}}): {exc}") from exc
    if not annotations:
        raise DataError(f"{where}: empty annotation list (expected at least one object)")
    image = decode_image_bytes(record[image_key], where)
    h, w = image.shape[1:]
    if (info.get("height", h), info.get("width", w)) != (h, w):
        raise DataError(f"{where}: image size {h}x{w} does not match {info['height']}x{info['width']} in its .json")
    segmentations = [a.get("segmentation") for a in annotations]
    masks = decode_compressed_rles(segmentations, h, w)  # all masks in one vectorised pass
    if masks is None:  # not all well-formed compressed RLEs: check each (names the bad one, compresses
        # uncompressed counts), then decode them as above
        rles = [
            check_rle(s, h, w, f"{where} annotation {a.get('id')}")
            for s, a in zip(segmentations, annotations, strict=True)
        ]
        masks = decode_compressed_rles(rles, h, w)
    class_ids = torch.tensor([int(a.get("category_id", -1)) for a in annotations], dtype=torch.int64)
    extra = {k: (tuple(info[k]) if k == "spacing" else info[k]) for k in MEDICAL_KEYS if k in info}
    return make_sample(image, torch.from_numpy(masks), id=str(info.get("id", record["__key__"])),
                       source=f"{record.get('__url__')}:{record['__key__']}", class_ids=class_ids, **extra)


def list_shards(urls: str | Path | Sequence[str | Path]) -> tuple[list[str], dict[str, int]]:
    """A shard folder (index.json or *.tar), a brace pattern or a list -> (shard paths, samples per shard)."""
    if isinstance(urls, str | Path) and Path(urls).is_dir():
        folder = Path(urls)
        index_file = folder / "index.json"
        if index_file.is_file():
            index = json.loads(index_file.read_text())
            shards = [str(folder / s["file"]) for s in index["shards"]]
            return shards, {str(folder / s["file"]): int(s["num_samples"]) for s in index["shards"]}
        shards = sorted(str(p) for p in folder.glob("*.tar"))
        if not shards:
            raise DataError(f"{folder}: no *.tar shards found (expected the output of sam-train convert)")
        return shards, {}
    shards = wds.shardlists.expand_urls(str(urls)) if isinstance(urls, str | Path) else [str(u) for u in urls]
    if not shards:
        raise DataError(f"{urls}: no shards given")
    return shards, {}


class ShardDataset(torch.utils.data.IterableDataset):
    """Streams samples from webdataset shards; shards are split by node (rank) and by DataLoader worker.

    Args:
        urls: shard folder, brace pattern ("data/shard-{000000..000009}.tar") or list of shard paths.
        transform: optional callable on each sample (e.g. SamTransform).
        shuffle_buffer: size of the sample shuffle buffer (0 = no shuffling); shard order is shuffled too.
        resampled: for multi-node training: each rank draws its own random permutation of ALL shards
            each epoch, deals it out to its workers, and stops after epoch_size / nodes samples, so every
            rank sees the same number of samples whatever the shard count (ranks may overlap, as with
            any resampling); a permutation never repeats a shard, so one rank never yields a sample
            twice in an epoch. Needs enough shards: each worker must hold epoch_size / (nodes x
            workers) samples in its share, else its epoch ends early (logged).
        epoch_size: samples per epoch over all processes (resampled only; default: the data set size).
        seed: base seed of the shard and sample shuffles (mixed with rank, worker and epoch).
        on_error: "skip" (log + count truncated shards and malformed samples in `skips`) or "raise".
        max_skip_fraction: fail once more than this fraction of the samples seen was skipped.
    """

    def __init__(
        self,
        urls: str | Path | Sequence[str | Path],
        *,
        transform=None,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epoch_size: int | None = None,
        seed: int = 0,
        on_error: OnError = "skip",
        max_skip_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        self.shards, self.counts = list_shards(urls)
        self.transform = transform
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.seed = seed
        self.epoch = 0
        self._iterations = 0  # per process: persistent workers get a fresh order every epoch
        self.skips = SkipCounter(on_error=on_error, max_skip_fraction=max_skip_fraction)
        known = sum(self.counts.values()) if len(self.counts) == len(self.shards) else None
        self.epoch_size = epoch_size if epoch_size is not None else known
        if resampled and self.epoch_size is None:
            raise ValueError(f"{urls}: resampled=True needs epoch_size (no index.json to count the samples)")
        if resampled and known is not None and self.epoch_size > known:
            raise ValueError(f"epoch_size {self.epoch_size} > {known} samples: a process would repeat samples")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Samples this rank yields per epoch (over all its workers); needs index.json or epoch_size."""
        rank, world, _, _ = wds.utils.pytorch_worker_info()
        if self.resampled:
            return math.ceil(self.epoch_size / world)
        if len(self.counts) != len(self.shards):
            raise TypeError("ShardDataset length is unknown without index.json")
        return sum(self.counts[s] for s in self.shards[rank::world])

    def _rng(self, *, shared_by_workers: bool = False) -> random.Random:
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        info = torch.utils.data.get_worker_info()
        # torch seeds workers with base_seed + worker id, base_seed new per DataLoader iteration, so
        # each epoch gets a fresh order; in-process the iteration counter plays that role
        base = (info.seed - info.id) if info is not None else self._iterations
        who = f"{rank}" if shared_by_workers else f"{rank}/{worker}"
        return random.Random(f"{self.seed}/{self.epoch}/{base}/{who}")

    def _shard_source(self, rng: random.Random) -> Iterator[dict[str, str]]:
        if self.resampled:
            # one permutation of ALL shards per rank and epoch, dealt out to the rank's workers: no
            # shard (so no sample) twice on one rank in an epoch, whatever the number of shards
            _, _, worker, workers = wds.utils.pytorch_worker_info()
            order = list(self.shards)
            self._rng(shared_by_workers=True).shuffle(order)
            yield from ({"url": u} for u in order[worker::workers])
            return
        mine = list(wds.split_by_worker(wds.split_by_node(iter(self.shards))))
        if self.shuffle_buffer > 0:
            rng.shuffle(mine)
        yield from ({"url": u} for u in mine)

    def _handle(self, exc: BaseException) -> bool:
        """webdataset handler for shard-level errors (truncated / corrupt tar, unreadable file).

        Returns False for errors inside a tar stream (webdataset then stops reading that shard: the
        rest of a truncated tar is unreadable) and True elsewhere (go on with the next shard).
        """
        if isinstance(exc, DataError):
            if self.skips.on_error == "raise":
                exc.args = exc.args[:1]  # webdataset appends (stream, url) to args on the way up
                raise exc
            source, _, reason = str(exc.args[0]).partition(": ")
            self.skips.skip(source, reason, exc)
            return True
        urls = [a for a in exc.args if isinstance(a, str) and a in self.shards]
        named = re.search(r"name='([^']*)'", str(exc.args[0])) if exc.args else None
        source = urls[-1] if urls else (named.group(1) if named else "<unknown shard>")
        detail = str(exc.args[0]).split(" @ ")[0] if exc.args else ""
        reason = f"truncated or corrupt tar shard (expected a complete tar archive): {type(exc).__name__}: {detail}"
        self.skips.skip(source, reason, exc if isinstance(exc, Exception) else None)
        return bool(urls)

    def _decode(self, records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for record in records:
            try:
                sample = record_to_sample(record)
            except DataError as exc:
                self._handle(exc)
                continue
            self.skips.ok()
            yield self.transform(sample) if self.transform is not None else sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._iterations += 1
        rng = self._rng()
        stages: list[Any] = [
            lambda: self._shard_source(rng),
            wds.tarfile_to_samples(handler=self._handle),
        ]
        if self.shuffle_buffer > 0:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng))
        stages.append(self._decode)
        stream: Iterator[dict[str, Any]] = iter(wds.DataPipeline(*stages))
        if self.resampled:
            _, world, _, workers = wds.utils.pytorch_worker_info()
            per_process = math.ceil(self.epoch_size / (world * workers))
            count = 0
            for sample in stream:
                if count >= per_process:
                    break
                count += 1
                yield sample
            if count < per_process:
                log.warning("resampled epoch ended after %d of %d samples (skipped samples?)", count, per_process)
            return
        yield from stream
