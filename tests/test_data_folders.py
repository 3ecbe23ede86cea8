"""Image + mask folders: label-image layout (PNG / 16-bit TIFF) and mask-per-object layout (JPEG images)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sam_train.data.folders import FolderDataset


def _labels(h=24, w=32, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.zeros((h, w), np.uint16)
    labels[2:10, 3:12] = 7
    labels[12:20, 15:30] = 300  # > 255: needs a 16-bit label image
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return image, labels


def test_label_image_layout_png_and_tiff(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    image, labels = _labels()
    Image.fromarray(image).save(tmp_path / "img" / "a.png")
    Image.fromarray((labels % 200).astype(np.uint8)).save(tmp_path / "lab" / "a.png")  # 8-bit png ids 7, 100
    Image.fromarray(image).save(tmp_path / "img" / "b.tif")
    Image.fromarray(labels).save(tmp_path / "lab" / "b.tiff")  # 16-bit tiff ids 7, 300
    ds = FolderDataset(tmp_path / "img", tmp_path / "lab", labels_are_classes=True)
    assert ds.layout == "label_image" and len(ds) == 2
    a, b = ds[0], ds[1]
    assert a["id"] == "a" and b["id"] == "b"
    assert np.array_equal(a["image"].permute(1, 2, 0).numpy(), image)
    assert b["class_ids"].tolist() == [7, 300] and a["class_ids"].tolist() == [7, 100]
    assert torch.equal(b["masks"], torch.from_numpy(np.stack([labels == 7, labels == 300])))


def test_mask_per_object_layout_with_jpeg_images(tmp_path):
    (tmp_path / "img").mkdir()
    _, labels = _labels()
    yy, xx = np.mgrid[0:24, 0:32]
    image = np.stack([yy * 8, xx * 6, yy * 4 + xx * 3], axis=2).astype(np.uint8)  # smooth: jpeg-friendly
    Image.fromarray(image).save(tmp_path / "img" / "c.jpg", quality=95)
    (tmp_path / "masks" / "c").mkdir(parents=True)
    for k, value in enumerate((7, 300)):
        Image.fromarray(((labels == value) * 255).astype(np.uint8)).save(tmp_path / "masks" / "c" / f"obj{k}.png")
    ds = FolderDataset(tmp_path / "img", tmp_path / "masks")
    assert ds.layout == "mask_per_object"
    s = ds[0]
    assert torch.equal(s["masks"], torch.from_numpy(np.stack([labels == 7, labels == 300])))
    assert s["class_ids"].tolist() == [-1, -1]
    # jpeg is lossy: close to the original, not equal
    assert np.abs(s["image"].permute(1, 2, 0).numpy().astype(int) - image).mean() < 4
