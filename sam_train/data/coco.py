"""COCO-style instance segmentation json (polygons, uncompressed and compressed RLE) as samples."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO

from sam_train.data.image_io import read_image
from sam_train.data.rle import decode_segmentation
from sam_train.data.sample import DataError, OnError, SampleDataset, make_sample


def load_coco(annotation_file: str | Path) -> COCO:
    """Read a COCO json into a pycocotools COCO index; errors name the file."""
    path = Path(annotation_file)
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected a COCO annotation json)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid json: {exc}") from exc
    for key in ("images", "annotations"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(f"{path}: expected a COCO json with an {key!r} list")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def coco_image_sample(
    coco: COCO, image_id: Any, image_dir: str | Path, *, json_path: str, skip_crowd: bool = True
) -> dict[str, Any]:
    """Decode one COCO image and its annotations -> sample dict (image [3,H,W], masks [N,H,W])."""
    info = coco.imgs[image_id]
    image_path = Path(image_dir) / info["file_name"]
    where = f"{json_path} (image id {image_id}, {info['file_name']})"
    anns = [a for a in coco.imgToAnns.get(image_id, []) if not (skip_crowd and a.get("iscrowd", 0))]
    if not anns:
        raise DataError(f"{where}: empty annotation list (expected at least one object)")
    image = read_image(image_path)
    h, w = image.shape[1:]
    if (info.get("height", h), info.get("width", w)) != (h, w):
        raise DataError(
            f"{image_path}: image size {h}x{w} does not match {info['height']}x{info['width']} in {json_path}"
        )
    masks = np.stack(
        [decode_segmentation(a.get("segmentation"), h, w, f"{json_path} (annotation id {a.get('id')})") for a in anns]
    )
    class_ids = torch.tensor([int(a.get("category_id", -1)) for a in anns], dtype=torch.int64)
    return make_sample(
        image, torch.from_numpy(masks), id=str(image_id), source=str(image_path), class_ids=class_ids
    )


class CocoDataset(SampleDataset):
    """Map-style dataset over a COCO json + image folder; yields the sample dict of docs/architecture.md.

    Args:
        annotation_file: COCO json (instance masks as polygons, uncompressed or compressed RLE).
        image_dir: folder that `file_name` of each image is relative to.
        transform: optional callable on the sample (e.g. SamTransform).
        on_error: "raise" (clear DataError naming the file) or "skip" (logged, counted in `skips`).
        skip_crowd: drop iscrowd annotations (they are not single instances).
        max_skip_fraction: with on_error="skip", fail once more than this fraction is skipped.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        *,
        transform=None,
        on_error: OnError = "raise",
        skip_crowd: bool = True,
        max_skip_fraction: float = 0.1,
    ) -> None:
        super().__init__(transform=transform, on_error=on_error, max_skip_fraction=max_skip_fraction)
        self.annotation_file = str(annotation_file)
        self.image_dir = Path(image_dir)
        self.skip_crowd = skip_crowd
        self.coco = load_coco(annotation_file)
        self.image_ids: list[Any] = []
        # images without (non-crowd) annotations are found up front: an error or a counted skip
        for image_id in self.coco.getImgIds():
            anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not (skip_crowd and a.get("iscrowd", 0))]
            if anns:
                self.image_ids.append(image_id)
                self.skips.ok()
            else:
                name = self.coco.imgs[image_id].get("file_name")
                self.skips.skip(self.annotation_file, f"image id {image_id} ({name}): empty annotation list "
                                "(expected at least one object)")
        if not self.image_ids:
            raise DataError(f"{self.annotation_file}: no image with annotations (expected at least one)")

    def __len__(self) -> int:
        return len(self.image_ids)

    def source_of(self, index: int) -> str:
        return str(self.image_dir / self.coco.imgs[self.image_ids[index]]["file_name"])

    def load(self, index: int) -> dict[str, Any]:
        return coco_image_sample(
            self.coco, self.image_ids[index], self.image_dir, json_path=self.annotation_file, skip_crowd=self.skip_crowd
        )
