"""AutomaticMaskGenerator equals the official `SamAutomaticMaskGenerator` on the same weights and image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from official import build_official
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils import amg as official_amg
from skimage import morphology

from sam_train.inference.amg import (
    AutomaticMaskGenerator,
    build_point_grid,
    generate_crop_boxes,
    remove_small_regions,
    stability_score,
)
from sam_train.models import build_sam, sam_config
from sam_train.models.resize import resize_longest_side
from sam_train.prompts.boxes import masks_to_boxes


def _discs_image() -> np.ndarray:
    """[150, 200, 3] uint8: six flat-coloured discs on a grey background (regions for masks to follow)."""
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(150.0), torch.arange(200.0), indexing="ij")
    img = torch.full((3, 150, 200), 40.0)
    for _ in range(6):
        cx, cy, r = torch.rand(3, generator=gen) * torch.tensor([200, 150, 40.0]) + torch.tensor([0, 0, 15.0])
        img[:, (xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = (torch.rand(3, generator=gen) * 255)[:, None]
    return img.to(torch.uint8).permute(1, 2, 0).numpy().copy()


@pytest.fixture(scope="module")
def models():
    """Official and our vit_t with the same weights.

    A plain random decoder predicts salt-and-pepper masks whose boxes all span the image, so box NMS
    would keep one mask. Larger random decoder weights and piecewise-constant upscaling kernels give
    compact masks with varied boxes, so every filter and the NMS have something to do.
    """
    ref = build_official(sam_config("vit_t"))
    gen = torch.Generator().manual_seed(1)
    sd = ref.state_dict()
    for k, v in sd.items():
        if k.startswith(("mask_decoder.", "prompt_encoder.")) and v.ndim >= 2 and "iou_prediction_head" not in k:
            sd[k] = torch.randn(v.shape, generator=gen) * 0.4
            if k.startswith("mask_decoder.output_upscaling") and v.ndim == 4:
                sd[k] = sd[k][:, :, :1, :1].expand_as(v).clone()
    ref.load_state_dict(sd)
    ours = build_sam("vit_t").eval()
    ours.load_state_dict(sd, strict=True)
    return ref, ours


def _official_generator(ref, **kwargs) -> SamAutomaticMaskGenerator:
    gen = SamAutomaticMaskGenerator(ref, **kwargs)
    # It resizes with PIL; we use torch's antialiased bilinear. Give it ours so both encode the same pixels.
    gen.predictor.transform.apply_image = lambda im: (
        resize_longest_side(torch.from_numpy(im).permute(2, 0, 1), 256).permute(1, 2, 0).numpy()
    )
    return gen


def _mask(seg) -> np.ndarray:
    return mask_utils.decode(seg).astype(bool) if isinstance(seg, dict) else seg


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(output_mode="coco_rle"),
        dict(output_mode="binary_mask", crop_n_layers=1, points_per_batch=50),
    ],
    ids=["full_image_rle", "crops_binary"],
)
def test_generate_matches_official(models, kwargs):
    ref, ours = models
    # Thresholds low enough for a random model to produce masks; the pred-IoU filter still removes some.
    cfg = dict(points_per_side=8, pred_iou_thresh=0.05, stability_score_thresh=0.5, **kwargs)
    image = _discs_image()
    expected = _official_generator(ref, **cfg).generate(image)
    got = AutomaticMaskGenerator(ours, **cfg).generate(image)
    assert len(got) == len(expected) >= 3
    assert len({tuple(r["bbox"]) for r in got}) >= 3  # distinct masks, not one duplicated
    for a, b in zip(got, expected, strict=True):
        ma, mb = _mask(a["segmentation"]), _mask(b["segmentation"])
        assert ma.shape == mb.shape == (150, 200)
        assert (ma & mb).sum() / (ma | mb).sum() >= 0.99
        if cfg["output_mode"] == "coco_rle":
            assert a["segmentation"]["size"] == b["segmentation"]["size"] and isinstance(
                a["segmentation"]["counts"], str
            )
        assert abs(a["area"] - b["area"]) <= 0.01 * b["area"]
        assert np.abs(np.subtract(a["bbox"], b["bbox"])).max() <= 1
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-4)
        assert a["stability_score"] == pytest.approx(b["stability_score"], abs=1e-4)
        np.testing.assert_allclose(a["point_coords"], b["point_coords"], atol=1e-6)
        np.testing.assert_array_equal(a["crop_box"], b["crop_box"])
        assert a["area"] == int(ma.sum())


def test_defaults_match_official():
    import inspect

    ours = inspect.signature(AutomaticMaskGenerator).parameters
    theirs = inspect.signature(SamAutomaticMaskGenerator).parameters
    for name, p in ours.items():
        if name != "model":
            assert p.default == theirs[name].default, name


def test_helpers_match_official():
    np.testing.assert_allclose(build_point_grid(5).numpy(), official_amg.build_point_grid(5), atol=1e-12)
    for size, layers in [((150, 200), 1), ((301, 97), 2)]:
        boxes, layer_ids = official_amg.generate_crop_boxes(size, layers, 512 / 1500)
        assert generate_crop_boxes(size, layers, 512 / 1500) == [
            (tuple(b), i) for b, i in zip(boxes, layer_ids, strict=True)
        ]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 20, 30, generator=gen) * 3
    ref = official_amg.calculate_stability_score(logits, 0.0, 1.0)
    assert torch.allclose(stability_score(logits, 0.0, 1.0), ref)
    masks = logits > 4
    masks[0] = False
    assert torch.equal(masks_to_boxes(masks).long(), official_amg.batched_mask_to_box(masks))  # what amg uses


def test_remove_small_regions_matches_skimage():
    gen = np.random.default_rng(0)
    mask = np.zeros((60, 60), dtype=bool)
    mask[5:40, 5:40] = True  # big object
    mask[10:13, 10:13] = False  # 9-pixel hole
    mask[50:53, 50:52] = True  # 6-pixel island
    mask |= gen.random((60, 60)) > 0.995  # specks
    out, changed = remove_small_regions(mask, 20)
    expected = morphology.remove_small_holes(mask, max_size=19, connectivity=2)
    expected = morphology.remove_small_objects(expected, max_size=19, connectivity=2)
    assert changed and np.array_equal(out, expected)
    assert remove_small_regions(expected, 20)[1] is False


def test_min_mask_region_area_and_bad_mode(models):
    _, ours = models
    out = AutomaticMaskGenerator(
        ours, points_per_side=4, pred_iou_thresh=0.05, stability_score_thresh=0.5, min_mask_region_area=50
    ).generate(_discs_image())
    assert out
    for r in out:
        assert remove_small_regions(r["segmentation"], 50)[1] is False  # nothing small left to clean
    # Official thresholds on a random model: nothing passes, and the empty paths still work.
    assert AutomaticMaskGenerator(ours, points_per_side=4, crop_n_layers=1).generate(_discs_image()) == []
    with pytest.raises(ValueError, match="output_mode"):
        AutomaticMaskGenerator(ours, output_mode="polygons")
