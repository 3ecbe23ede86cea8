"""The vectorised RLE decoder and the torchvision image decoder against pycocotools / Pillow."""

from __future__ import annotations

import io

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from sam_train.data.image_io import decode_image_bytes
from sam_train.data.rle import decode_compressed_rles, encode_mask
from sam_train.data.sample import DataError


def _random_masks(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    masks = []
    for _ in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(1, max(h, w) / 2)
        masks.append(((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) | (rng.random((h, w)) < 0.01))
    masks += [np.zeros((h, w), bool), np.ones((h, w), bool)]  # runs of 0 and of h*w
    return np.stack(masks)


@pytest.mark.parametrize("h, w", [(37, 53), (256, 256), (1, 300)])
def test_decode_compressed_rles_matches_pycocotools(h, w):
    masks = _random_masks(np.random.default_rng(h * w), 9, h, w)
    segmentations = [encode_mask(m) for m in masks]
    ours = decode_compressed_rles(segmentations, h, w)
    theirs = np.stack([mask_utils.decode({"size": [h, w], "counts": s["counts"].encode()}) for s in segmentations])
    assert ours.dtype == bool and ours.shape == (len(masks), h, w)
    assert torch.from_numpy(ours).sum().item() == int(masks.sum())  # torch reads the strides
    np.testing.assert_array_equal(ours, theirs.astype(bool))
    np.testing.assert_array_equal(ours, masks)


@pytest.mark.parametrize(
    "bad",
    [
        {"size": [8, 8], "counts": "0"},  # runs sum to 0, not 64
        {"size": [8, 9], "counts": "0`1"},  # wrong size for the image
        {"size": [8, 8], "counts": "0\x01"},  # invalid character
        {"size": [8, 8], "counts": [64]},  # uncompressed: not this fast path
        {"size": [8, 8]},  # no counts
    ],
)
def test_decode_compressed_rles_refuses_malformed(bad):
    good = encode_mask(np.eye(8, dtype=bool))
    assert decode_compressed_rles([good], 8, 8) is not None
    assert decode_compressed_rles([good, bad], 8, 8) is None


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_decode_image_bytes_matches_pillow(fmt, mode):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (21, 34, 3) if mode == "RGB" else (21, 34), dtype=np.uint8)
    data = _encoded(array, fmt)
    ours = decode_image_bytes(data, "x")
    pillow = np.array(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == (3, 21, 34)
    # JPEG decoders may round the colour conversion differently by one level
    assert np.abs(ours.numpy().astype(int) - pillow).max() <= (1 if fmt == "JPEG" else 0)


def test_decode_image_bytes_16_bit_png_falls_back_to_pillow():
    array = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 500).astype(np.uint16)
    image = decode_image_bytes(_encoded(array, "PNG"), "x")
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 12, 10)


@pytest.mark.parametrize("data", [b"", b"not an image", _encoded(np.zeros((4, 4, 3), np.uint8), "JPEG")[:20]])
def test_decode_image_bytes_names_the_source_of_bad_bytes(data):
    with pytest.raises(DataError, match=r"shard-7\.tar \(sample 3\): unreadable image bytes"):
        decode_image_bytes(data, "shard-7.tar (sample 3)")


def test_shard_record_with_uncompressed_rle_decodes_like_pycocotools():
    """SA-1B-style json written by other tools may hold uncompressed counts: the reader's slow path
    validates each annotation, compresses it and decodes all masks with the same decoder."""
    import json

    from sam_train.data.image_io import encode_image
    from sam_train.data.webdataset import record_to_sample

    masks = _random_masks(np.random.default_rng(3), 3, 20, 30)
    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    uncompressed = [[int(r) for r in np.diff(np.r_[0, np.flatnonzero(np.diff(np.r_[0, m.flatten("F"), 2])), m.size])]
                    for m in masks.astype(np.int8)]
    annotations = [{"id": 0, "segmentation": {"size": [20, 30], "counts": uncompressed[0]}}]
    annotations += [{"id": k, "segmentation": encode_mask(m)} for k, m in enumerate(masks[1:], 1)]
    meta = {"image": {"id": "x", "height": 20, "width": 30}, "annotations": annotations}
    record = {"__key__": "k", "__url__": "s.tar", "png": encode_image(image), "json": json.dumps(meta).encode()}
    sample = record_to_sample(record)
    np.testing.assert_array_equal(sample["masks"].numpy(), masks)
