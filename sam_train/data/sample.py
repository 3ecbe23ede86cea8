"""The one sample format every sam_train dataset yields, its batch collation and skip accounting.

Sample dict (see docs/architecture.md):

| key | type | meaning |
|---|---|---|
| `image` | uint8 [3, H, W] | RGB (grey replicated to 3 channels) |
| `masks` | bool [N, H, W] | instance masks, one per object |
| `id` | str | unique sample id |
| `source` | str | file the sample came from |
| `class_ids` | int64 [N] | optional class of each mask (-1 unknown) |
| `case_id`, `slice_index`, `spacing`, `axis` | | medical slices only |

After `SamTransform`: image [3, S, S], masks [N, S, S], plus `input_size` and `original_size`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from sam_train.errors import SamTrainError

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
META_KEYS = ("source", "case_id", "slice_index", "spacing", "axis")


class DataError(SamTrainError, ValueError):
    """Bad input data; the message names the file and what was expected."""


def check_on_error(on_error: str) -> OnError:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    return on_error  # type: ignore[return-value]


def grey_to_rgb(array: np.ndarray, where: str) -> torch.Tensor:
    """[H, W], [H, W, 1|3|4] uint8 array -> uint8 tensor [3, H, W] (grey replicated, alpha dropped)."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise DataError(f"{where}: expected a grey or RGB(A) image, got array of shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        raise DataError(f"{where}: expected an 8-bit image, got dtype {array.dtype}")
    array = array[:, :, :3] if array.shape[2] >= 3 else np.repeat(array, 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def make_sample(
    image: torch.Tensor,
    masks: torch.Tensor,
    *,
    id: str,
    source: str,
    class_ids: torch.Tensor | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Build and validate a sample dict. image uint8 [3,H,W], masks bool [N,H,W], class_ids int64 [N]."""
    if class_ids is None:
        class_ids = torch.full((masks.shape[0],), -1, dtype=torch.int64)
    sample = {"image": image, "masks": masks, "id": id, "source": source, "class_ids": class_ids, **extra}
    validate_sample(sample)
    return sample


def validate_sample(sample: Mapping[str, Any]) -> None:
    """Raise DataError (naming the sample's source) unless `sample` follows the sample format."""
    where = f"{sample.get('source', '<unknown source>')} (sample {sample.get('id', '?')!r})"
    for key in ("image", "masks", "id", "source"):
        if key not in sample:
            raise DataError(f"{where}: sample is missing key {key!r}")
    image, masks = sample["image"], sample["masks"]
    if not (isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3):
        got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise DataError(f"{where}: image must be uint8 [3, H, W], got {got}")
    if not (isinstance(masks, torch.Tensor) and masks.dtype == torch.bool and masks.ndim == 3):
        got = f"{masks.dtype} {tuple(masks.shape)}" if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise DataError(f"{where}: masks must be bool [N, H, W], got {got}")
    if masks.shape[1:] != image.shape[1:]:
        raise DataError(
            f"{where}: mask size {tuple(masks.shape[1:])} does not match image size {tuple(image.shape[1:])}"
        )
    class_ids = sample.get("class_ids")
    if class_ids is not None and (class_ids.dtype != torch.int64 or tuple(class_ids.shape) != (masks.shape[0],)):
        raise DataError(
            f"{where}: class_ids must be int64 [{masks.shape[0]}], got {class_ids.dtype} {tuple(class_ids.shape)}"
        )


def collate_objects(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The per-object part of a batch (docs/architecture.md, batch format), shared by `collate_sam` and the
    decoder-only `collate_embeddings`: masks bool [M,S,S] (all objects concatenated); image_ids int64 [M];
    input_sizes / original_sizes int64 [B,2] (default: the image's size); class_ids int64 [M] (-1 where a
    sample has none); ids list[str]; meta list[dict]."""
    masks = [s["masks"] for s in samples]
    counts = torch.tensor([m.shape[0] for m in masks], dtype=torch.int64)
    class_ids = [
        s["class_ids"] if s.get("class_ids") is not None else torch.full((m.shape[0],), -1, dtype=torch.int64)
        for s, m in zip(samples, masks, strict=True)
    ]

    def size_of(s: Mapping[str, Any], key: str) -> tuple[int, int]:
        return tuple(s[key]) if key in s else tuple(s["image"].shape[1:])  # type: ignore[return-value]

    return {
        "masks": torch.cat(masks),
        "image_ids": torch.repeat_interleave(torch.arange(len(samples)), counts),
        "input_sizes": torch.tensor([size_of(s, "input_size") for s in samples], dtype=torch.int64),
        "original_sizes": torch.tensor([size_of(s, "original_size") for s in samples], dtype=torch.int64),
        "class_ids": torch.cat(class_ids),
        "ids": [s["id"] for s in samples],
        "meta": [{k: s[k] for k in META_KEYS if k in s} for s in samples],
    }


def stack_per_image(samples: Sequence[Mapping[str, Any]], key: str, caller: str, hint: str = "") -> torch.Tensor:
    """`torch.stack` of every sample's `key` (image, embedding), with one-line errors naming `caller` for an
    empty list and for shapes that differ (`hint` says what makes them equal)."""
    if not samples:
        raise ValueError(f"{caller} got an empty list of samples")
    shapes = {tuple(s[key].shape) for s in samples}
    if len(shapes) != 1:
        raise DataError(f"{caller}: the {key}s of one batch must share a shape{hint}, got {sorted(shapes)}")
    return torch.stack([s[key] for s in samples])


def collate_sam(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Transformed samples (all images [3, S, S]) -> batch dict (docs/architecture.md, batch format).

    images uint8 [B,3,S,S], then the objects (`collate_objects`).
    """
    images = stack_per_image(samples, "image", "collate_sam", " (use SamTransform)")
    return {"images": images, **collate_objects(samples)}


class SkipCounter:
    """Counts skipped samples per source file and per reason; logs each skip.

    Raises DataError once the skipped fraction of seen samples exceeds `max_skip_fraction` (after at
    least `min_seen` samples), so a data set that is mostly broken fails loudly instead of training on
    scraps. `on_error="raise"` turns every problem into an immediate DataError.
    """

    def __init__(self, *, on_error: OnError = "raise", max_skip_fraction: float = 0.1, min_seen: int = 20) -> None:
        self.on_error = check_on_error(on_error)
        self.max_skip_fraction = max_skip_fraction
        self.min_seen = min_seen
        self.seen = 0
        self.by_source: Counter[str] = Counter()
        self.by_reason: Counter[str] = Counter()

    @property
    def skipped(self) -> int:
        return sum(self.by_source.values())

    def ok(self) -> None:
        """Record one sample read successfully."""
        self.seen += 1

    def skip(self, source: str, reason: str, exc: BaseException | None = None) -> None:
        """Record (or, with on_error='raise', raise) a bad input naming `source` and `reason`."""
        message = f"{source}: {reason}"
        if self.on_error == "raise":
            raise DataError(message) from exc
        self.seen += 1
        self.by_source[source] += 1
        self.by_reason[reason.split(":")[0]] += 1
        log.warning("skipping bad sample (%d skipped so far): %s", self.skipped, message)
        if self.seen >= self.min_seen and self.skipped > self.max_skip_fraction * self.seen:
            raise DataError(
                f"too many bad samples: {self.skipped} of {self.seen} skipped "
                f"(> max_skip_fraction={self.max_skip_fraction}); last: {message}; per file: {dict(self.by_source)}"
            )

    def summary(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": self.skipped, "by_source": dict(self.by_source)}


class SampleDataset(torch.utils.data.Dataset):
    """Map-style base: subclasses implement `__len__`, `load(index) -> sample` and `source_of(index)`.

    Applies the optional `transform` and the on_error policy: with "skip", a sample that fails to load
    is logged and counted in `self.skips` and the next index is served instead, so one bad file never
    stops an epoch and batches keep their size.
    """

    def __init__(self, *, transform=None, on_error: OnError = "raise", max_skip_fraction: float = 0.1) -> None:
        self.transform = transform
        self.skips = SkipCounter(on_error=on_error, max_skip_fraction=max_skip_fraction)

    def load(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def source_of(self, index: int) -> str:
        raise NotImplementedError

    def try_load(self, index: int) -> dict[str, Any] | None:
        """Load and validate sample `index` (no transform); None (logged, counted) if it is bad and
        on_error="skip"; DataError if on_error="raise"."""
        try:
            sample = self.load(index)
            validate_sample(sample)
        except DataError as exc:
            # DataError messages start with the file name
            source, _, reason = str(exc).partition(": ")
            self.skips.skip(source, reason, exc)
            return None
        except Exception as exc:  # decoders raise many types (OSError, ValueError, RuntimeError)
            self.skips.skip(self.source_of(index), f"{type(exc).__name__}: {exc}", exc)
            return None
        self.skips.ok()
        return sample

    def iter_samples(self):
        """Every readable sample exactly once, untransformed (for conversion to shards)."""
        for index in range(len(self)):
            sample = self.try_load(index)
            if sample is not None:
                yield sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        for attempt in range(min(n, 100)):
            sample = self.try_load((index + attempt) % n)
            if sample is not None:
                return self.transform(sample) if self.transform is not None else sample
        raise DataError(f"{type(self).__name__}: no readable sample found from index {index} on")
