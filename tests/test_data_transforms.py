"""SamTransform geometry (vs the official ResizeLongestSide), joint augmentation, mask filtering; collate_sam."""

from __future__ import annotations

import torch
from segment_anything.utils.transforms import ResizeLongestSide

from sam_train.data.sample import collate_sam, make_sample
from sam_train.data.transforms import SamTransform
from sam_train.models.resize import resize_masks_longest_side


def _sample(h=30, w=60, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for k in range(n):
        y, x = int(torch.randint(0, h - 8, (), generator=g)), int(torch.randint(0, w - 8, (), generator=g))
        masks[k, y : y + 8, x : x + 8] = True
    image = (masks.any(0) * 255).to(torch.uint8).expand(3, h, w).clone()  # image = union of the masks
    return make_sample(image, masks, id="s", source="test", class_ids=torch.arange(n))


def test_resize_longest_side_and_pad_match_official_shape():
    s = _sample()
    out = SamTransform(64)(s)
    expected = ResizeLongestSide(64).get_preprocess_shape(30, 60, 64)
    assert out["input_size"] == tuple(expected) == (32, 64)
    assert out["original_size"] == (30, 60)
    assert out["image"].shape == (3, 64, 64) and out["masks"].shape == (3, 64, 64)
    assert out["image"][:, 32:].eq(0).all() and not out["masks"][:, 32:].any()  # padding bottom/right
    assert torch.equal(out["masks"][:, :32], resize_masks_longest_side(s["masks"], 64))


def test_aspect_ignoring_resize():
    out = SamTransform(64, keep_aspect=False)(_sample())
    assert out["input_size"] == (64, 64)
    assert out["masks"].flatten(1).sum(1).gt(0).all()


def test_flips_move_image_and_masks_together():
    s = _sample()
    out = SamTransform(60, hflip_p=1.0, vflip_p=1.0)(s)  # 60: no resize of the 30x60 image
    assert torch.equal(out["masks"][:, :30], s["masks"].flip(-1).flip(-2))
    assert torch.equal(out["image"][:, :30], s["image"].flip(-1).flip(-2))


def test_scale_jitter_keeps_masks_on_the_image():
    t = SamTransform(64, hflip_p=0.5, scale_jitter=(0.5, 2.0))
    g = torch.Generator().manual_seed(0)
    sizes = set()
    for seed in range(8):
        out = t(_sample(seed=seed), generator=g)
        assert out["image"].shape == (3, 64, 64)
        union, bright = out["masks"].any(0), out["image"][0] > 127
        iou = (union & bright).sum() / (union | bright).sum().clamp(min=1)
        assert iou > 0.85
        sizes.add(out["input_size"])
    assert len(sizes) > 3


def test_same_generator_seed_same_result():
    t = SamTransform(64, hflip_p=0.5, vflip_p=0.5, scale_jitter=(0.7, 1.5))
    a = t(_sample(), generator=torch.Generator().manual_seed(5))
    b = t(_sample(), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["masks"], b["masks"])


def test_mask_filtering_and_subsampling():
    h, w = 20, 20
    masks = torch.zeros(70, h, w, dtype=torch.bool)
    masks[0] = True  # covers 100% > 90%: dropped (SAM paper)
    # masks[1] stays empty: dropped
    for k in range(2, 70):
        masks[k, k % 20, :5] = True
    s = make_sample(torch.zeros(3, h, w, dtype=torch.uint8), masks, id="f", source="t",
                    class_ids=torch.arange(70))
    t = SamTransform(20, max_objects=64, max_mask_fraction=0.9)
    out = t(s, generator=torch.Generator().manual_seed(0))
    assert out["masks"].shape[0] == 64
    assert set(out["class_ids"].tolist()) <= set(range(2, 70))
    kept = out["class_ids"]
    assert torch.equal(out["masks"], masks[kept])  # class ids follow their masks
    assert t.dropped == {"too_large": 1, "empty_or_small": 1, "over_max_objects": 4}


def test_collate_sam_batch_format():
    t = SamTransform(64)
    samples = [t(_sample(n=n, seed=n)) for n in (2, 3, 1)]
    batch = collate_sam(samples)
    assert batch["images"].shape == (3, 3, 64, 64) and batch["images"].dtype == torch.uint8
    assert batch["masks"].shape == (6, 64, 64) and batch["masks"].dtype == torch.bool
    assert batch["image_ids"].tolist() == [0, 0, 1, 1, 1, 2]
    assert batch["class_ids"].tolist() == [0, 1, 0, 1, 2, 0]
    assert batch["input_sizes"].tolist() == [[32, 64]] * 3 and batch["original_sizes"].tolist() == [[30, 60]] * 3
    assert batch["ids"] == ["s"] * 3 and batch["meta"] == [{"source": "test"}] * 3
    assert torch.equal(batch["masks"][2:5], samples[1]["masks"])
