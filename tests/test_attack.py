"""Prompt-agnostic PGD attack on the image encoder, and the clean-vs-attacked IoU report."""

from __future__ import annotations

import pytest
import torch

from sam_train.eval.attack import pgd_embedding_attack, robustness_report
from sam_train.inference.predictor import SamPredictor
from sam_train.prompts.points import center_points


@pytest.fixture
def image():
    """[1, 3, 192, 256] float 0-255 with saturated pixels, so the valid-range clamp matters."""
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(1, 3, 192, 256, generator=gen) * 255
    x[..., :20, :] = 0.0
    x[..., -20:, :] = 255.0
    return x


def _attack(model, x, eps, steps=4, seed=0):
    return pgd_embedding_attack(
        model.image_encoder,
        x,
        preprocess=model.preprocess,
        eps=eps,
        steps=steps,
        generator=torch.Generator().manual_seed(seed),
    )


def test_eps_zero_changes_nothing(tiny_sam, image):
    adv, history = _attack(tiny_sam, image, eps=0.0, steps=2)
    assert torch.equal(adv, image)
    assert history.shape == (3,) and torch.all(history == 0)


def test_perturbation_bounded_and_distance_grows(tiny_sam, image):
    tiny_sam.train()
    eps = 4 / 255
    adv, history = _attack(tiny_sam, image, eps=eps)
    delta = adv - image
    assert delta.abs().max() <= eps * 255 + 1e-3
    assert delta.abs().max() > 0.5 * eps * 255  # it did move
    assert adv.min() >= 0 and adv.max() <= 255
    assert history.shape == (5,)
    assert history[-1] > history[0] > 0
    assert tiny_sam.training  # mode restored
    assert all(p.grad is None for p in tiny_sam.parameters())  # no gradients leaked into the model

    # Better than random noise of the same budget: the gradient steps found a harmful direction.
    tiny_sam.eval()
    with torch.no_grad():
        clean = tiny_sam.image_encoder(tiny_sam.preprocess(image))
        gen = torch.Generator().manual_seed(1)
        noise = torch.randint(0, 2, image.shape, generator=gen).float().mul(2).sub(1) * eps * 255
        noisy = tiny_sam.image_encoder(tiny_sam.preprocess((image + noise).clamp(0, 255)))
        attacked = tiny_sam.image_encoder(tiny_sam.preprocess(adv))
    assert (attacked - clean).norm() > (noisy - clean).norm()
    assert (attacked - clean).norm() == pytest.approx(float(history.max()), rel=1e-4)


def test_bigger_budget_moves_embedding_further(tiny_sam, image):
    small = _attack(tiny_sam, image, eps=1 / 255, steps=3)[1]
    big = _attack(tiny_sam, image, eps=8 / 255, steps=3)[1]
    assert big.max() > small.max()


def test_point_prompt_is_deepest():  # the attack's point prompt: center_points
    masks = torch.zeros(2, 40, 50, dtype=torch.bool)
    masks[0, 10:31, 5:16] = True  # 21 x 11 rectangle: centre column x = 10
    masks[1, 0:9, 0:9] = True  # touches the border: the click stays inside, away from the edges
    pts = center_points(masks)[0]
    assert pts[0, 0] == 10 and 15 <= pts[0, 1] <= 25
    assert torch.equal(pts[1], torch.tensor([4.0, 4.0]))


def test_report(tiny_sam):
    gen = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (3, 120, 160), generator=gen, dtype=torch.uint8)
    masks = torch.zeros(3, 120, 160, dtype=torch.bool)
    masks[0, 10:60, 20:90] = True
    masks[1, 70:110, 100:150] = True  # masks[2] stays empty: skipped
    sample = {"image": image, "masks": masks, "id": "s0", "source": "mem"}
    report = robustness_report(tiny_sam, [sample], [0.0, 4 / 255], generator=gen, steps=2)
    assert report["num_objects"] == 2
    assert set(report["clean"]) == {"point", "box"} and set(report["attacked"]) == {0.0, 4 / 255}
    # eps = 0 is the clean image, so the same IoUs.
    assert report["attacked"][0.0] == report["clean"]
    assert report["embedding_distance"][0.0] == 0.0 and report["embedding_distance"][4 / 255] > 0
    # The clean box IoU recomputed by hand with the predictor.
    predictor = SamPredictor(tiny_sam.eval())
    predictor.set_image(image)
    boxes = torch.tensor([[20.0, 10, 89, 59], [100, 70, 149, 109]])
    pred = predictor.predict(boxes=boxes, multimask_output=False)[0][:, 0]
    target = masks[:2]
    iou = ((pred & target).sum((1, 2)) / (pred | target).sum((1, 2))).mean()
    assert report["clean"]["box"] == pytest.approx(float(iou), abs=1e-6)
    for values in [report["clean"], *report["attacked"].values()]:
        assert all(0.0 <= v <= 1.0 for v in values.values())
    with pytest.raises(ValueError, match="mem"):
        robustness_report(tiny_sam, [{**sample, "masks": masks[:, :10]}], [0.0], generator=gen)
