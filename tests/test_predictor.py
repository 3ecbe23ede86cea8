"""SamPredictor equals the official `segment_anything.SamPredictor` on the same weights and image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from official import official_and_ours
from segment_anything import SamPredictor as OfficialPredictor
from segment_anything.utils.transforms import ResizeLongestSide

from sam_train.inference.predictor import SamPredictor
from sam_train.models.resize import resize_longest_side

TOL = 1e-4


@pytest.fixture(scope="module")
def models():
    return official_and_ours("vit_t")


@pytest.fixture(scope="module")
def image():
    """A smooth-ish random uint8 image of 150 x 200 (not the model size, so resizing matters)."""
    gen = torch.Generator().manual_seed(3)
    small = torch.randint(0, 256, (3, 15, 20), generator=gen).float()
    big = torch.nn.functional.interpolate(small[None], (150, 200), mode="bilinear")[0]
    return big.round().clamp(0, 255).to(torch.uint8)


def _pair(models, image):
    ref, ours = models
    pred = SamPredictor(ours)
    pred.set_image(image)
    official = OfficialPredictor(ref)
    # The official predictor resizes with PIL; feed it our resized tensor so both encode the same pixels.
    official.set_torch_image(resize_longest_side(image, 256)[None].float(), tuple(image.shape[1:]))
    return pred, official


def _prompts(original_size, gen):
    h, w = original_size
    scale = torch.tensor([w, h], dtype=torch.float32)
    coords = torch.rand(3, 2, 2, generator=gen) * scale
    labels = torch.tensor([[1, 0], [1, 1], [1, -1]])
    x0y0 = torch.rand(3, 2, generator=gen) * scale * 0.5
    boxes = torch.cat([x0y0, x0y0 + scale * 0.4], dim=1)
    masks = torch.randn(3, 1, 64, 64, generator=gen)
    return coords, labels, boxes, masks


@pytest.mark.parametrize("kind", ["points", "boxes", "points_boxes", "points_mask"])
@pytest.mark.parametrize("multimask", [True, False])
def test_predict_matches_official(models, image, kind, multimask):
    pred, official = _pair(models, image)
    assert (pred.get_image_embedding() - official.get_image_embedding()).abs().max() <= TOL
    assert pred.input_size == tuple(official.input_size) and pred.original_size == tuple(official.original_size)
    coords, labels, boxes, masks = _prompts(pred.original_size, torch.Generator().manual_seed(5))
    args = {
        "points": dict(point_coords=coords, point_labels=labels),
        "boxes": dict(boxes=boxes),
        "points_boxes": dict(point_coords=coords, point_labels=labels, boxes=boxes),
        "points_mask": dict(point_coords=coords, point_labels=labels, mask_input=masks),
    }[kind]
    out = pred.predict(**args, multimask_output=multimask, return_logits=True)

    # The official predict_torch wants model-input coordinates: transform them with its own class.
    tr = ResizeLongestSide(256)
    ref_coords = tr.apply_coords_torch(coords, pred.original_size) if "point_coords" in args else None
    ref_boxes = tr.apply_boxes_torch(boxes, pred.original_size) if "boxes" in args else None
    ref = official.predict_torch(
        ref_coords,
        labels if ref_coords is not None else None,
        ref_boxes,
        args.get("mask_input"),
        multimask_output=multimask,
        return_logits=True,
    )
    k = 3 if multimask else 1
    assert out[0].shape == (3, k, 150, 200) and out[1].shape == (3, k) and out[2].shape == (3, k, 64, 64)
    for a, b in zip(out, ref, strict=True):
        assert (a - b).abs().max() <= TOL
    binary = pred.predict(**args, multimask_output=multimask)[0]
    assert binary.dtype == torch.bool and torch.equal(binary, out[0] > 0)


def test_numpy_image_and_cached_embedding(models, image):
    _, ours = models
    a = SamPredictor(ours)
    a.set_image(image.permute(1, 2, 0).numpy())  # HWC numpy, as read by PIL / cv2
    b = SamPredictor(ours)
    b.set_image(image)
    assert torch.equal(a.get_image_embedding(), b.get_image_embedding())
    c = SamPredictor(ours)
    c.set_image_embedding(b.get_image_embedding(), b.input_size, b.original_size)
    pts, lbl = np.array([[[50.0, 60.0]]]), np.array([[1]])
    for x, y in zip(b.predict(pts, lbl), c.predict(pts, lbl), strict=True):
        assert torch.equal(x, y)


def test_bad_inputs_raise(models, image):
    pred = SamPredictor(models[1])
    with pytest.raises(RuntimeError, match="set_image"):
        pred.predict(boxes=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="HWC"):
        pred.set_image(np.zeros((8, 8), dtype=np.uint8))
    pred.set_image(image)
    with pytest.raises(ValueError, match="point_labels"):
        pred.predict(point_coords=torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match="same number of prompts"):
        pred.predict(point_coords=torch.zeros(2, 1, 2), point_labels=torch.ones(2, 1), boxes=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="mask_input"):
        pred.predict(boxes=torch.zeros(1, 4), mask_input=torch.zeros(1, 1, 32, 32))
