"""COCO reader: polygons / uncompressed / compressed RLE against pycocotools, and the COCO -> shards
round trip. `write_coco` is also used by the other data tests."""

from __future__ import annotations

import json
import tarfile
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


@pytest.mark.parametrize("image_format", ["keep", "png", "jpg"])
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
    if image_format in ("keep", "png"):  # lossless: images identical to the originals too
        originals = {str(100 + i): np.array(Image.open(image_dir / f"img_{i}.png")) for i in range(5)}
        for s in samples:
            assert np.array_equal(s["image"].permute(1, 2, 0).numpy(), originals[s["id"]])


def test_keep_stores_the_source_jpeg_bytes_and_re_encodes_the_rest(tmp_path):
    """image_format="keep": 8-bit JPEG / PNG sources go into the shard byte for byte (no second lossy
    compression); sources that need a conversion (palette here) are stored as lossless PNG."""
    json_path, image_dir = write_coco(tmp_path, n_images=3)
    Image.open(image_dir / "img_0.png").save(image_dir / "img_0.jpg", quality=80)
    Image.open(image_dir / "img_1.png").convert("P").save(image_dir / "img_1.png")
    data = json.loads(json_path.read_text())
    data["images"][0]["file_name"] = "img_0.jpg"
    json_path.write_text(json.dumps(data))
    convert("coco", json_path, tmp_path / "shards", image_dir=image_dir, progress=False)
    with tarfile.open(next((tmp_path / "shards").glob("*.tar"))) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    by_id = {json.loads(v)["image"]["id"]: k.rsplit(".", 1)[0] for k, v in members.items() if k.endswith(".json")}
    assert members[by_id["100"] + ".jpg"] == (image_dir / "img_0.jpg").read_bytes()
    assert members[by_id["102"] + ".png"] == (image_dir / "img_2.png").read_bytes()
    assert by_id["101"] + ".png" in members  # palette image: re-encoded as RGB PNG
    assert members[by_id["101"] + ".png"] != (image_dir / "img_1.png").read_bytes()
    samples = {s["id"]: s for s in ShardDataset(tmp_path / "shards", shuffle_buffer=0)}
    expected = np.array(Image.open(image_dir / "img_1.png").convert("RGB"))
    assert np.array_equal(samples["101"]["image"].permute(1, 2, 0).numpy(), expected)
