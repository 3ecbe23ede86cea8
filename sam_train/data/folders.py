"""Image + mask folders (PNG / TIFF / JPEG) as samples.

Two layouts, chosen by `layout` ("auto" picks by looking at `mask_dir`):

- "label_image": `mask_dir/<stem>.<ext>`: one label image per image, integer object ids, 0 = background.
- "mask_per_object": `mask_dir/<stem>/<any>.<ext>`: one binary mask file per object.

Images are `image_dir/<stem>.<ext>`; extensions of image and masks may differ (`a.jpg` + `a.png`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from sam_train.data.image_io import IMAGE_SUFFIXES, read_image, read_label_image, read_mask
from sam_train.data.sample import DataError, OnError, SampleDataset, make_sample

Layout = Literal["auto", "label_image", "mask_per_object"]


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def detect_layout(mask_dir: Path) -> str:
    """"mask_per_object" if mask_dir holds sub-folders, else "label_image"."""
    return "mask_per_object" if any(p.is_dir() for p in mask_dir.iterdir()) else "label_image"


class FolderDataset(SampleDataset):
    """Map-style dataset over an image folder and a mask folder (see module docstring for layouts).

    Args:
        image_dir: folder of images.
        mask_dir: folder of label images, or of one sub-folder of mask files per image.
        layout: "auto", "label_image" or "mask_per_object".
        labels_are_classes: label_image layout only; the ids are class ids (semantic labels): each id
            still gives one mask, and class_ids carries the id (else -1).
        transform, on_error, max_skip_fraction: as for every SampleDataset.
    """

    def __init__(
        self,
        image_dir: str | Path,
        mask_dir: str | Path,
        *,
        layout: Layout = "auto",
        labels_are_classes: bool = False,
        transform=None,
        on_error: OnError = "raise",
        max_skip_fraction: float = 0.1,
    ) -> None:
        super().__init__(transform=transform, on_error=on_error, max_skip_fraction=max_skip_fraction)
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        for folder, what in ((self.image_dir, "image"), (self.mask_dir, "mask")):
            if not folder.is_dir():
                raise DataError(f"{folder}: {what} folder not found")
        self.layout = detect_layout(self.mask_dir) if layout == "auto" else layout
        if self.layout not in ("label_image", "mask_per_object"):
            raise ValueError(f"layout must be 'auto', 'label_image' or 'mask_per_object', got {layout!r}")
        self.labels_are_classes = labels_are_classes
        masks_by_stem: dict[str, Path] = {}
        if self.layout == "label_image":
            masks_by_stem = {p.stem: p for p in _image_files(self.mask_dir)}
        else:
            masks_by_stem = {p.name: p for p in self.mask_dir.iterdir() if p.is_dir()}
        self.items: list[tuple[Path, Path]] = []
        for image in _image_files(self.image_dir):
            mask = masks_by_stem.get(image.stem)
            if mask is None:
                expected = f"{self.mask_dir / image.stem}" + ("/*.png" if self.layout == "mask_per_object" else ".png")
                self.skips.skip(str(image), f"missing mask file (expected {expected})")
            else:
                self.items.append((image, mask))
                self.skips.ok()
        if not self.items:
            raise DataError(f"{self.image_dir}: no image with a matching mask in {self.mask_dir}")

    def __len__(self) -> int:
        return len(self.items)

    def source_of(self, index: int) -> str:
        return str(self.items[index][0])

    def load(self, index: int) -> dict[str, Any]:
        image_path, mask_path = self.items[index]
        image = read_image(image_path)
        if self.layout == "label_image":
            labels = read_label_image(mask_path)
            self._check_size(labels.shape, image, mask_path, image_path)
            ids = np.unique(labels)
            ids = ids[ids != 0]
            masks = labels[None] == ids[:, None, None]
            class_ids = torch.from_numpy(ids) if self.labels_are_classes else torch.full((len(ids),), -1)
        else:
            files = _image_files(mask_path)
            if not files:
                raise DataError(f"{mask_path}: empty mask folder (expected one mask file per object)")
            arrays = []
            for f in files:
                arrays.append(read_mask(f))
                self._check_size(arrays[-1].shape, image, f, image_path)
            masks = np.stack(arrays)
            class_ids = torch.full((len(files),), -1)
        if masks.shape[0] == 0:
            raise DataError(f"{mask_path}: no objects (expected at least one non-zero label)")
        return make_sample(
            image,
            torch.from_numpy(np.ascontiguousarray(masks)),
            id=image_path.stem,
            source=str(image_path),
            class_ids=class_ids.to(torch.int64),
        )

    @staticmethod
    def _check_size(shape: tuple[int, ...], image: torch.Tensor, mask_path: Path, image_path: Path) -> None:
        if tuple(shape[:2]) != tuple(image.shape[1:]):
            raise DataError(
                f"{mask_path}: mask size {shape[0]}x{shape[1]} does not match image {image_path} "
                f"size {image.shape[1]}x{image.shape[2]}"
            )
