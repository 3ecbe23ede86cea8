"""SamTransform: resize + pad to the model input, joint image/mask augmentation, mask filtering."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F

from sam_train.models.resize import (
    preprocess_shape,
    resize_image,
    resize_longest_side,
    resize_masks,
    resize_masks_longest_side,
)
from sam_train.seeding import derive_seed

log = logging.getLogger(__name__)


class SamTransform:
    """Callable on a sample dict (docs/architecture.md) -> transformed sample.

    Output: image uint8 [3, S, S] (content top-left, zero padding bottom/right), masks bool [N', S, S],
    class_ids int64 [N'], `input_size` (h, w of the content before padding) and `original_size` (H, W).

    Args:
        img_size: S, the model input size (e.g. 1024, 256 for vit_t).
        keep_aspect: resize the longest side to S as SAM does; False resizes to S x S ignoring the aspect
            ratio (MedSAM style).
        hflip_p, vflip_p: probabilities of horizontal / vertical flips (image and masks together).
        scale_jitter: (lo, hi) range of a random scale of the resized content; > 1 zooms in and crops a
            random S x S window, < 1 shrinks and pads. Training only: `input_size` then no longer maps
            back to `original_size`.
        max_objects: at most this many masks are kept, sampled at random (SAM paper: 64 per image).
        max_mask_fraction: masks covering more than this fraction of the image are dropped (SAM: 0.9).
        min_mask_area: masks with fewer pixels (before or after resizing) are dropped.
        seed: seed of the per-process generator used when __call__ gets no generator. Each DataLoader
            worker derives its own stream from it so workers do not repeat each other's augmentations.
    """

    def __init__(
        self,
        img_size: int,
        *,
        keep_aspect: bool = True,
        hflip_p: float = 0.0,
        vflip_p: float = 0.0,
        scale_jitter: tuple[float, float] = (1.0, 1.0),
        max_objects: int | None = 64,
        max_mask_fraction: float = 0.9,
        min_mask_area: int = 1,
        seed: int = 0,
    ) -> None:
        if scale_jitter[0] <= 0 or scale_jitter[0] > scale_jitter[1]:
            raise ValueError(f"scale_jitter must be (lo, hi) with 0 < lo <= hi, got {scale_jitter}")
        self.img_size = img_size
        self.keep_aspect = keep_aspect
        self.hflip_p = hflip_p
        self.vflip_p = vflip_p
        self.scale_jitter = tuple(scale_jitter)
        self.max_objects = max_objects
        self.max_mask_fraction = max_mask_fraction
        self.min_mask_area = min_mask_area
        self.seed = seed
        self.dropped: Counter[str] = Counter()  # masks dropped per reason, in this process
        self._generator: torch.Generator | None = None
        self._generator_key: Any = None
        self._next_seed: int | None = None

    def seed_next(self, seed: int) -> None:
        """Seed the generator of the next call that gets no explicit generator.

        SamDataModule seeds every training sample from (seed, epoch, index), so augmentations are a pure
        function of the sample's position in training and a resumed run repeats them exactly (a
        per-process stream would restart from its seed after a resume).
        """
        self._next_seed = seed

    def _default_generator(self) -> torch.Generator:
        info = torch.utils.data.get_worker_info()
        key = None if info is None else (info.id, info.seed)
        if self._generator is None or key != self._generator_key:
            seed = self.seed if info is None else derive_seed(self.seed, info.seed)
            self._generator = torch.Generator().manual_seed(seed)
            self._generator_key = key
        return self._generator

    def _uniform(self, generator: torch.Generator) -> float:
        return float(torch.rand((), generator=generator))

    def filter_masks(
        self, masks: torch.Tensor, class_ids: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop empty / tiny / too-large masks and subsample to max_objects. masks bool [N, H, W]."""
        area = masks.flatten(1).sum(1)
        too_small = area < max(self.min_mask_area, 1)
        too_large = area > self.max_mask_fraction * masks.shape[1] * masks.shape[2]
        self.dropped["empty_or_small"] += int(too_small.sum())
        self.dropped["too_large"] += int(too_large.sum())
        keep = torch.nonzero(~(too_small | too_large)).flatten()
        if self.max_objects is not None and keep.numel() > self.max_objects:
            self.dropped["over_max_objects"] += keep.numel() - self.max_objects
            keep = keep[torch.randperm(keep.numel(), generator=generator)[: self.max_objects]].sort().values
        return masks[keep], class_ids[keep]

    def __call__(self, sample: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        if generator is None and self._next_seed is not None:
            generator, self._next_seed = torch.Generator().manual_seed(self._next_seed), None
        g = generator if generator is not None else self._default_generator()
        image, masks = sample["image"], sample["masks"]
        class_ids = sample.get("class_ids")
        if class_ids is None:
            class_ids = torch.full((masks.shape[0],), -1, dtype=torch.int64)
        original_size = tuple(image.shape[1:])
        masks, class_ids = self.filter_masks(masks, class_ids, g)

        # flips before resizing: cheaper on small originals, identical result
        if self.hflip_p > 0 and self._uniform(g) < self.hflip_p:
            image, masks = image.flip(-1), masks.flip(-1)
        if self.vflip_p > 0 and self._uniform(g) < self.vflip_p:
            image, masks = image.flip(-2), masks.flip(-2)

        lo, hi = self.scale_jitter
        scale = lo + (hi - lo) * self._uniform(g) if hi > lo else lo
        long_side = max(int(self.img_size * scale + 0.5), 1)
        if self.keep_aspect:
            image = resize_longest_side(image, long_side)
            masks = resize_masks_longest_side(masks, long_side)
        else:
            image = resize_image(image, (long_side, long_side))
            masks = resize_masks(masks, (long_side, long_side))

        h, w = image.shape[1:]
        if h > self.img_size or w > self.img_size:  # zoomed in: random S x S window
            y0 = int(torch.randint(0, max(h - self.img_size, 0) + 1, (), generator=g))
            x0 = int(torch.randint(0, max(w - self.img_size, 0) + 1, (), generator=g))
            image = image[:, y0 : y0 + self.img_size, x0 : x0 + self.img_size]
            masks = masks[:, y0 : y0 + self.img_size, x0 : x0 + self.img_size]
            h, w = image.shape[1:]
            nonempty = masks.flatten(1).sum(1) >= max(self.min_mask_area, 1)
            self.dropped["cropped_out"] += int((~nonempty).sum())
            masks, class_ids = masks[nonempty], class_ids[nonempty]

        pad = (0, self.img_size - w, 0, self.img_size - h)
        out = dict(sample)
        out["image"] = F.pad(image, pad)
        out["masks"] = F.pad(masks, pad)
        out["class_ids"] = class_ids
        out["input_size"] = (int(h), int(w))
        out["original_size"] = (int(original_size[0]), int(original_size[1]))
        return out

    def input_size_for(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the content for an original (H, W) without scale jitter."""
        if self.keep_aspect:
            return preprocess_shape(*original_size, self.img_size)
        return (self.img_size, self.img_size)
