"""COCO reader: polygons / uncompressed / compressed RLE against pycocotools, and the COCO -> shards
round trip. `write_coco` is also used by the other data tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from sam_train.data.coco import CocoDataset
from sam_train.data.convert import convert
from sam_train.data.webdataset import ShardDataset


def write_coco(tmp: Path, *, n_images: int = 3, size: tuple[int, int] = (40, 56), seed: int = 0) -> tuple[Path, Path]:
    """COCO json mixing polygon, uncompressed-RLE and compressed-RLE annotations + PNG images."""
    rng = np.random.default_rng(seed)
    image_dir = tmp / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    h, w = size
    images, anns = [], []
    for i in range(n_images):
        name = f"img_{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(image_dir / name)
        images.append({"id": 100 + i, "file_name": name, "height": h, "width": w})
        # polygon (a triangle), uncompressed RLE, compressed RLE, crowd
        anns.append({"id": len(anns), "image_id": 100 + i, "category_id": 1, "iscrowd": 0,
                     "segmentation": [[2.0, 2.0, 30.0, 5.0, 10.0, 25.0]]})
        m = np.zeros((h, w), np.uint8, order="F")
        m[5 + i : 20, 30:50] = 1
        anns.append({"id": len(anns), "image_id": 100 + i, "category_id": 2, "iscrowd": 0,
                     "segmentation": {"size": [h, w], "counts": _uncompressed_counts(m)}})
        m2 = (rng.random((h, w)) > 0.7).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(m2))
        anns.append({"id": len(anns), "image_id": 100 + i, "category_id": 3, "iscrowd": 0,
                     "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}})
        anns.append({"id": len(anns), "image_id": 100 + i, "category_id": 4, "iscrowd": 1,
                     "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}})
    path = tmp / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": k, "name": f"c{k}"} for k in (1, 2, 3, 4)]}))
    return path, image_dir


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE of a 0/1 mask, column-major, starting with a run of zeros."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return [int(c) for c in counts]


def reference_masks(json_path: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Non-crowd masks per image decoded by pycocotools itself (annToMask)."""
    coco = COCO(str(json_path))
    out = {}
    for image_id in coco.getImgIds():
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        out[str(image_id)] = (np.stack([coco.annToMask(a).astype(bool) for a in anns]),
                              [a["category_id"] for a in anns])
    return out


def test_coco_dataset_matches_pycocotools(tmp_path):
    json_path, image_dir = write_coco(tmp_path)
    ref = reference_masks(json_path)
    ds = CocoDataset(json_path, image_dir)
    assert len(ds) == 3
    for sample in (ds[i] for i in range(len(ds))):
        masks, cats = ref[sample["id"]]
        assert sample["masks"].shape == (3, 40, 56)  # polygon, uncompressed RLE, compressed RLE (crowd dropped)
        assert torch.equal(sample["masks"], torch.from_numpy(masks))
        assert sample["class_ids"].tolist() == cats == [1, 2, 3]
        assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 40, 56)
    # the polygon and uncompressed RLE are non-trivial
    assert all(m.sum() > 50 for m in ref["100"][0])


def test_coco_keeps_crowd_when_asked(tmp_path):
    json_path, image_dir = write_coco(tmp_path)
    assert CocoDataset(json_path, image_dir, skip_crowd=False)[0]["masks"].shape[0] == 4


@pytest.mark.parametrize("image_format", ["png", "jpg"])
def test_coco_to_shards_round_trip(tmp_path, image_format):
    """COCO json -> convert -> shards -> reader: masks identical to pycocotools' decode."""
    json_path, image_dir = write_coco(tmp_path, n_images=5)
    ref = reference_masks(json_path)
    shards = convert("coco", json_path, tmp_path / "shards", image_dir=image_dir, shard_size=2,
                     image_format=image_format, progress=False)
    assert len(shards) == 3
    samples = list(ShardDataset(tmp_path / "shards", shuffle_buffer=4))
    assert sorted(s["id"] for s in samples) == sorted(ref)
    for s in samples:
        masks, cats = ref[s["id"]]
        assert torch.equal(s["masks"], torch.from_numpy(masks))
        assert s["class_ids"].tolist() == cats
    if image_format == "png":  # lossless: images identical to the originals too
        originals = {str(100 + i): np.array(Image.open(image_dir / f"img_{i}.png")) for i in range(5)}
        for s in samples:
            assert np.array_equal(s["image"].permute(1, 2, 0).numpy(), originals[s["id"]])
