"""Prompt-agnostic adversarial robustness of the image encoder (Croce & Hein, "Segment (Almost) Nothing",
arXiv 2311.14450).

The attack never sees a prompt: PGD under an L-infinity budget pushes the image embedding of x + delta as
far as possible (L2) from the clean embedding, which breaks the masks of every later prompt at once.
`robustness_report` measures what that does to point- and box-prompted IoU.

Units: images are 0-255 pixels (as `Sam.preprocess` takes them); eps and step_size are fractions of the
pixel range, as in the literature: eps = 2/255 lets every pixel move by at most 2 grey levels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sam_train.inference.predictor import SamPredictor
from sam_train.losses.functional import mask_iou
from sam_train.models.resize import resize_longest_side
from sam_train.models.sam import Sam
from sam_train.prompts.boxes import masks_to_boxes
from sam_train.prompts.points import center_points

PIXEL_MAX = 255.0


def _embedding_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, ...] x [B, ...] -> [B] L2 distance per image."""
    return (a - b).flatten(1).norm(dim=1)


def pgd_embedding_attack(
    image_encoder: nn.Module,
    images: torch.Tensor,
    *,
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    eps: float,
    generator: torch.Generator,
    steps: int = 10,
    step_size: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maximise ||E(x + delta) - E(x)||_2 subject to ||delta||_inf <= eps and 0 <= x + delta <= 255.

    Sign-gradient ascent (PGD) from a uniform random start in the eps-ball; each image keeps its
    farthest iterate. The encoder's parameters get no gradients, and its train/eval mode is restored.

    Args:
        image_encoder: maps preprocess(x) [B, 3, S, S] -> embeddings [B, C, h, w] (e.g. `Sam.image_encoder`).
        images: [B, 3, h, w] 0-255 pixels (uint8 or float), longest side already resized, not padded.
        preprocess: 0-255 pixels -> encoder input (e.g. `Sam.preprocess`: normalise and pad).
        eps: L-infinity budget as a fraction of the pixel range (4/255 = 4 grey levels); 0 returns x.
        generator: draws the random start (on the generator's device).
        steps: PGD iterations.
        step_size: per-step change, same units as eps; default 2.5 * eps / steps (Madry et al.).
    Returns:
        adversarial images [B, 3, h, w] float 0-255, and the batch-mean embedding distance [steps + 1]
        after the random start and after every step (the distance of the current iterate, not the best).
    """
    if eps < 0 or steps < 0:
        raise ValueError(f"eps and steps must be >= 0, got eps={eps}, steps={steps}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, h, w] 0-255 pixels, got {tuple(images.shape)}")
    bound = eps * PIXEL_MAX
    alpha = (2.5 * eps / max(steps, 1) if step_size is None else step_size) * PIXEL_MAX
    x = images.detach().float()
    was_training = image_encoder.training
    image_encoder.eval()  # no drop-path noise: the attack should see the deployed model
    try:
        # With autograd on, like the attacked forwards: attention picks other kernels under no_grad,
        # and the ~1e-6 difference would make the distance at delta = 0 non-zero.
        clean = image_encoder(preprocess(x.clone().requires_grad_(True))).detach()
        start = torch.rand(x.shape, generator=generator, device=generator.device).to(x.device)
        delta = (2 * start - 1) * bound
        delta = (x + delta).clamp(0, PIXEL_MAX) - x
        best, best_dist = x + delta, torch.full((x.shape[0],), -1.0, device=x.device)
        history = []
        for step in range(steps + 1):
            delta.requires_grad_(True)
            dist = _embedding_distance(image_encoder(preprocess(x + delta)), clean)
            history.append(dist.detach().mean())
            improved = dist.detach() > best_dist
            best = torch.where(improved[:, None, None, None], (x + delta).detach(), best)
            best_dist = torch.where(improved, dist.detach(), best_dist)
            if step == steps:
                break
            # Squared distance: same ascent direction per image, and a defined (zero) gradient at delta = 0.
            (grad,) = torch.autograd.grad(dist.square().sum(), delta)
            with torch.no_grad():
                delta = (delta + alpha * grad.sign()).clamp(-bound, bound)
                delta = (x + delta).clamp(0, PIXEL_MAX) - x  # stay a valid image
    finally:
        image_encoder.train(was_training)
    return best.detach(), torch.stack(history).cpu()


def _prompted_ious(predictor: SamPredictor, masks: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """IoU per object for each prompt kind on the predictor's current image (masks at the original size)."""
    out = {}
    for kind in prompts:
        if kind == "point":
            points = center_points(masks)[0][:, None]  # [N, 1, 2]: the same click clean and attacked
            pred, iou_pred, _ = predictor.predict(points, torch.ones(len(masks), 1), multimask_output=True)
            pred = pred[torch.arange(len(masks)), iou_pred.argmax(1)]  # the mask SAM rates best
        elif kind == "box":
            pred = predictor.predict(boxes=masks_to_boxes(masks), multimask_output=False)[0][:, 0]
        else:
            raise ValueError(f"unknown prompt kind {kind!r}; expected 'point' or 'box'")
        out[kind] = mask_iou(pred.cpu(), masks)
    return out


def robustness_report(
    model: Sam,
    samples: Iterable[Mapping[str, Any]],
    eps_list: Sequence[float],
    *,
    generator: torch.Generator,
    prompts: Sequence[str] = ("point", "box"),
    steps: int = 10,
    step_size: float | None = None,
) -> dict[str, Any]:
    """Clean vs attacked mean IoU of point- and box-prompted masks.

    Args:
        model: the SAM to evaluate (used in eval mode).
        samples: dataset samples (`image` uint8 [3, H, W], `masks` bool [N, H, W]); empty masks are skipped.
        eps_list: L-infinity budgets as fractions of the pixel range, e.g. (1/255, 2/255, 4/255).
        generator: random starts of the attack.
        prompts: "point" (the centre click of `prompts.points.center_points`, best of 3 masks) and/or "box" (tight box).
        steps, step_size: PGD settings, see `pgd_embedding_attack`.
    Returns:
        {"clean": {prompt: mIoU}, "attacked": {eps: {prompt: mIoU}}, "embedding_distance": {eps: mean L2},
         "num_objects": int}.
    """
    predictor = SamPredictor(model)
    clean: dict[str, list[torch.Tensor]] = {p: [] for p in prompts}
    attacked: dict[float, dict[str, list[torch.Tensor]]] = {float(e): {p: [] for p in prompts} for e in eps_list}
    distance: dict[float, list[float]] = {float(e): [] for e in eps_list}
    num_objects = 0
    was_training = model.training
    model.eval()
    try:
        for sample in samples:
            source = sample.get("source", sample.get("id", "?"))
            image, masks = sample["image"], sample["masks"]
            if image.ndim != 3 or image.shape[0] != 3 or masks.ndim != 3 or masks.shape[1:] != image.shape[1:]:
                raise ValueError(
                    f"{source}: expected image [3, H, W] and masks [N, H, W] of the same size, "
                    f"got {tuple(image.shape)} and {tuple(masks.shape)}"
                )
            masks = masks[masks.flatten(1).any(1)].bool().cpu()
            if len(masks) == 0:
                continue
            num_objects += len(masks)
            original_size = (int(image.shape[1]), int(image.shape[2]))
            resized = resize_longest_side(image, model.img_size)[None].float().to(model.device)
            predictor.set_resized_image(resized, original_size)
            for kind, iou in _prompted_ious(predictor, masks, prompts).items():
                clean[kind].append(iou)
            for eps in attacked:
                adv, history = pgd_embedding_attack(
                    model.image_encoder,
                    resized,
                    preprocess=model.preprocess,
                    eps=eps,
                    generator=generator,
                    steps=steps,
                    step_size=step_size,
                )
                distance[eps].append(float(history.max()))  # one image: the returned (farthest) iterate
                predictor.set_resized_image(adv, original_size)
                for kind, iou in _prompted_ious(predictor, masks, prompts).items():
                    attacked[eps][kind].append(iou)
    finally:
        model.train(was_training)

    def mean(values: list[torch.Tensor]) -> float:
        return float(torch.cat(values).mean()) if values else float("nan")

    return {
        "clean": {p: mean(v) for p, v in clean.items()},
        "attacked": {e: {p: mean(v) for p, v in per.items()} for e, per in attacked.items()},
        "embedding_distance": {e: sum(d) / len(d) if d else float("nan") for e, d in distance.items()},
        "num_objects": num_objects,
    }
