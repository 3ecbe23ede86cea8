"""Simulated interactive segmentation for training (SAM paper, section 3 and appendix A).

Each object starts from a foreground click or a noisy box, then receives corrective clicks
sampled from its error region, with the previous low-res logits fed back as the mask prompt.
All M objects of a batch run through each decoder pass together: no Python loop over objects.

Prompt layout per object (identical to what the official predictor builds for that object alone,
so the batch never changes an object's result): point objects send their clicks then one padding
point; box objects send their corrective clicks then the two box corners (labels 2 and 3). Both
have (number of prompts so far + 1) tokens, so one [M, K] tensor holds the whole batch.

Random stream contract (replayed by the tests' per-object oracle, tests/prompt_reference.py), all from
`generator`:
1. the schedule (`iteration_schedule`: one randperm when mask-only iterations are random);
2. `rand(M, float64)` -> box or point per object (box where u < box_probability);
3. `rand(M, float64)` -> the first click of every object (used by point objects);
4. the box jitter of every object: `randn(M, 4)` ("gaussian") or `randint(0, max_shift + 1, (M, 4))`
   ("uniform_expand"), nothing for "none";
5. one `rand(M, float64)` per iteration that adds a corrective click.
With `loss_iterations` set below `num_iterations`, one `randperm` right after the schedule picks the
iterations that carry a loss (`loss_schedule`); nothing is drawn for it otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from sam_train.losses.functional import mask_iou
from sam_train.models.prompt_encoder import PAD, POSITIVE
from sam_train.models.sam import best_mask_token, upsample_logits
from sam_train.prompts.boxes import box_corner_points, expand_boxes_uniform, jitter_boxes, masks_to_boxes
from sam_train.prompts.points import CLICK_REGIONS, draw_uniform, sample_error_points, sample_points

# decode(image_embeddings [B,C,h,w], image_ids [M], point_coords [M,K,2], point_labels [M,K],
#        mask_inputs [M,1,4h,4w] | None, has_mask [M] | None) -> (logits [M,4,4h,4w], iou_pred [M,4])
DecodeFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
# loss_fn(low_res_logits [M,4,4h,4w], iou_pred [M,4], gt_masks [M,S,S], multimask [M] | bool)
#   -> dict with a scalar "loss" and "selected" [M] token indices (see sam_train.losses.sam_loss)
LossFn = Callable[..., dict[str, torch.Tensor]]

BOX_JITTERS = ("gaussian", "uniform_expand", "none")


@dataclass
class PromptSimulationConfig:
    """How the simulated user prompts each object; defaults are the SAM paper's."""

    num_iterations: int = 11  # decoder passes per object: first prompt + 8 clicks + 2 mask-only
    num_mask_only: int = 2  # iterations without a new click (mask prompt only)
    mask_only_at_end: bool = True  # one mask-only iteration is the last; the others are random
    box_probability: float = 0.5  # chance that an object's first prompt is a box, not a click
    box_jitter: str = "gaussian"  # "gaussian" (SAM), "uniform_expand" (MedSAM) or "none"
    box_noise_std: float = 0.1  # gaussian: noise std as a fraction of the box side
    box_max_noise: float = 20.0  # gaussian: cap on each coordinate's displacement, pixels
    box_max_shift: int = 20  # uniform_expand: largest outward shift of each side, pixels
    multimask_for_single_point: bool = True  # 3 masks (tokens 1..3) when the prompt is one click
    click_region: str = "error"  # "error": uniform over the larger error side (SAM); "inner": RITM's, see points.py
    mask_threshold: float = 0.0  # logit threshold of the prediction that errors are sampled from
    feed_mask_prompt: bool = True  # feed the previous (detached) logits back as the mask prompt
    # Iterations with a loss (and a backward pass): the first and loss_iterations - 1 others at random; the
    # rest only move the simulated user on, without gradients (RITM's iterative training). None or
    # >= num_iterations: all (SAM).
    loss_iterations: int | None = None

    def __post_init__(self) -> None:
        if self.num_iterations < 1:
            raise ValueError(f"PromptSimulationConfig.num_iterations must be >= 1, got {self.num_iterations}")
        at_end = int(self.mask_only_at_end and self.num_mask_only > 0)
        slots = self.num_iterations - 1 - at_end  # the first iteration always carries the first prompt
        if self.num_mask_only < 0 or self.num_mask_only - at_end > slots:
            raise ValueError(
                f"PromptSimulationConfig.num_mask_only={self.num_mask_only} does not fit in "
                f"num_iterations={self.num_iterations} (the first iteration always has a prompt)"
            )
        if not 0.0 <= self.box_probability <= 1.0:
            raise ValueError(f"PromptSimulationConfig.box_probability must be in [0, 1], got {self.box_probability}")
        if self.click_region not in CLICK_REGIONS:
            raise ValueError(f"PromptSimulationConfig.click_region must be one of {CLICK_REGIONS}, "
                             f"got {self.click_region!r}")
        if self.loss_iterations is not None and self.loss_iterations < 1:
            raise ValueError(f"PromptSimulationConfig.loss_iterations must be >= 1 or None, got {self.loss_iterations}")
        if self.box_jitter not in BOX_JITTERS:
            raise ValueError(f"PromptSimulationConfig.box_jitter must be one of {BOX_JITTERS}, got {self.box_jitter!r}")


def iteration_schedule(cfg: PromptSimulationConfig, generator: torch.Generator) -> list[bool]:
    """Which iterations add a prompt (True) and which are mask-only (False), shared by the batch.

    Iteration 0 always carries the first prompt; with `mask_only_at_end` the last iteration is
    mask-only; the remaining mask-only iterations take random distinct positions among the others
    (paper: 11 iterations, one mask-only among the 8 clicks and one at the end). Draws one
    `randperm` from `generator` when a random position is needed (one host sync on a GPU generator).
    """
    n = cfg.num_iterations
    schedule = [True] * n
    at_end = cfg.mask_only_at_end and cfg.num_mask_only > 0
    if at_end:
        schedule[-1] = False
    n_random = cfg.num_mask_only - int(at_end)
    if n_random > 0:
        slots = list(range(1, n - 1 if at_end else n))
        perm = torch.randperm(len(slots), generator=generator, device=generator.device)[:n_random]
        for p in perm.tolist():
            schedule[slots[p]] = False
    return schedule


def loss_schedule(cfg: PromptSimulationConfig, generator: torch.Generator) -> list[bool]:
    """Which iterations carry a loss: all by default; with `loss_iterations` = k < num_iterations the
    first (it trains the first prompt, box or click) and k - 1 distinct others from one `randperm`."""
    n, k = cfg.num_iterations, cfg.loss_iterations
    if k is None or k >= n:
        return [True] * n
    schedule = [True] + [False] * (n - 1)
    for p in torch.randperm(n - 1, generator=generator, device=generator.device)[: k - 1].tolist():
        schedule[1 + p] = True
    return schedule


def initial_boxes(
    gt_masks: torch.Tensor, cfg: PromptSimulationConfig, generator: torch.Generator, image_size: torch.Tensor
) -> torch.Tensor:
    """Tight boxes of bool [M, S, S] masks with the configured jitter -> float [M, 4]; image_size [M, 2]."""
    boxes = masks_to_boxes(gt_masks)
    if cfg.box_jitter == "gaussian":
        return jitter_boxes(
            boxes, generator, noise_std=cfg.box_noise_std, max_noise=cfg.box_max_noise, image_size=image_size
        )
    if cfg.box_jitter == "uniform_expand":
        return expand_boxes_uniform(boxes, generator, max_shift=cfg.box_max_shift, image_size=image_size)
    return boxes


def assemble_prompts(
    is_box: torch.Tensor,
    first_xy: torch.Tensor,
    boxes: torch.Tensor,
    clicks_xy: torch.Tensor,
    clicks_labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder prompts for all objects in the layout described in the module docstring.

    Args:
        is_box: bool [M]; first_xy: float [M, 2] first click; boxes: float [M, 4];
        clicks_xy: float [M, n, 2] and clicks_labels: int64 [M, n] corrective clicks so far.
    Returns:
        point_coords float [M, n + 2, 2], point_labels int64 [M, n + 2].
    """
    m = is_box.shape[0]
    pad_xy = first_xy.new_zeros(m, 1, 2)
    pad_lbl = torch.full((m, 1), PAD, dtype=torch.long, device=first_xy.device)
    first_lbl = torch.full((m, 1), POSITIVE, dtype=torch.long, device=first_xy.device)
    corner_xy, corner_lbl = box_corner_points(boxes)
    point_xy = torch.cat([first_xy[:, None], clicks_xy, pad_xy], dim=1)
    point_lbl = torch.cat([first_lbl, clicks_labels, pad_lbl], dim=1)
    box_xy = torch.cat([clicks_xy, corner_xy.to(clicks_xy.dtype)], dim=1)
    box_lbl = torch.cat([clicks_labels, corner_lbl], dim=1)
    coords = torch.where(is_box[:, None, None], box_xy, point_xy)
    labels = torch.where(is_box[:, None], box_lbl, point_lbl)
    return coords, labels


@dataclass
class SimulationResult:
    """Outputs of `simulate` (iters = cfg.num_iterations).

    loss: scalar sum over iterations of loss_fn's "loss" (None without loss_fn).
    losses: per-iteration loss_fn outputs.
    ious: float [iters, M] IoU of each iteration's chosen mask (at S x S, > threshold) with gt.
    selected: int64 [iters, M] chosen token per iteration (0 single, 1..3 multimask).
    num_prompts: per iteration, prompts given so far (first prompt + corrective clicks).
    schedule: per iteration, whether it adds a prompt; with_loss: whether it carries a loss.
    low_res_logits: float [M, 1, 4h, 4w] final chosen logits (not detached); iou_pred: float [M].
    point_coords, point_labels: final prompts [M, K, 2] / [M, K]; is_box: bool [M].
    all_logits: float [iters, M, 1, 4h, 4w] detached chosen logits of every iteration (return_all).
    """

    loss: torch.Tensor | None
    losses: list[dict[str, torch.Tensor]]
    ious: torch.Tensor
    selected: torch.Tensor
    num_prompts: list[int]
    schedule: list[bool]
    with_loss: list[bool]
    low_res_logits: torch.Tensor
    iou_pred: torch.Tensor
    point_coords: torch.Tensor
    point_labels: torch.Tensor
    is_box: torch.Tensor
    all_logits: torch.Tensor | None = field(default=None)


def _object_sizes(image_sizes: torch.Tensor | None, image_ids: torch.Tensor, s: int) -> torch.Tensor:
    if image_sizes is None:
        return torch.full((image_ids.shape[0], 2), s, device=image_ids.device)
    return image_sizes.to(image_ids.device)[image_ids]


def check_inputs(gt_masks: torch.Tensor, image_ids: torch.Tensor) -> None:
    """Clear errors for malformed simulation inputs (one host sync for the empty-mask check)."""
    if gt_masks.dim() != 3 or gt_masks.dtype != torch.bool:
        raise ValueError(f"gt_masks must be bool [M, S, S], got {gt_masks.dtype} {tuple(gt_masks.shape)}")
    if image_ids.shape != (gt_masks.shape[0],):
        raise ValueError(f"image_ids must be [M] = [{gt_masks.shape[0]}], got {tuple(image_ids.shape)}")
    if gt_masks.shape[0] and not bool(gt_masks.flatten(1).any(1).all()):
        raise ValueError("gt_masks contains empty masks: drop objects without foreground before prompting")


def single_click_multimask(cfg: PromptSimulationConfig, is_box: torch.Tensor, n_prompts: int) -> torch.Tensor | bool:
    """Which objects get multimask output: point objects whose only prompt is one click.

    Returns a plain bool when it is the same for every object (lets the loss skip the mixed path).
    """
    if not cfg.multimask_for_single_point or n_prompts != 1 or cfg.box_probability >= 1.0:
        return False
    if cfg.box_probability <= 0.0:
        return True
    return ~is_box


def simulate(
    decode: DecodeFn,
    image_embeddings: torch.Tensor,
    gt_masks: torch.Tensor,
    image_ids: torch.Tensor,
    cfg: PromptSimulationConfig,
    generator: torch.Generator,
    *,
    loss_fn: LossFn | None = None,
    return_all: bool = False,
    image_sizes: torch.Tensor | None = None,
    checkpoint_iterations: bool = False,
) -> SimulationResult:
    """Run the interactive prompting loop for all objects of a batch at once.

    Args:
        decode: `Sam.decode` or anything with its signature (see `DecodeFn`).
        image_embeddings: [B, C, h, w].
        gt_masks: bool [M, S, S] at model-input resolution, none empty.
        image_ids: int64 [M] image of each object.
        cfg: prompting options.
        generator: all randomness (see the module's random stream contract); on the masks' device
            to keep sampling there.
        loss_fn: called once per iteration with a loss (see `LossFn`, `loss_schedule`); its "selected"
            token is fed back for multimask objects. Elsewhere (and without it) the multimask token
            with the highest predicted IoU is, and the decoder runs without gradients.
        return_all: also keep every iteration's chosen logits (detached).
        image_sizes: int [B, 2] (h, w) of each image before padding, to clip boxes; default S x S.
        checkpoint_iterations: keep no activations of an iteration's decoder + loss for backward,
            recompute them there (torch.utils.checkpoint). Without it every iteration's decoder
            activations (two-way attention, upscaled masks: ~100 MiB per object at 1024 px in fp32)
            stay alive until backward, for all iterations x objects; with it, about its inputs and
            outputs (~1.5 MiB per object-iteration). Costs one more decoder forward per iteration.
    Returns:
        `SimulationResult`.
    """
    check_inputs(gt_masks, image_ids)
    m, s = gt_masks.shape[0], gt_masks.shape[-1]
    device = gt_masks.device
    schedule = iteration_schedule(cfg, generator)
    with_loss = loss_schedule(cfg, generator) if loss_fn is not None else [False] * cfg.num_iterations
    is_box = draw_uniform(m, generator, device) < cfg.box_probability
    first_xy, _ = sample_points(gt_masks, generator)
    boxes = initial_boxes(gt_masks, cfg, generator, _object_sizes(image_sizes, image_ids, s))
    clicks_xy = first_xy.new_zeros(m, 0, 2)
    clicks_lbl = torch.zeros(m, 0, dtype=torch.long, device=device)

    total: torch.Tensor | None = None
    losses, ious, selected, num_prompts, all_logits = [], [], [], [], []
    prev: torch.Tensor | None = None  # chosen low-res logits of the previous iteration
    pred_s = gt_masks  # thresholded previous prediction at S x S; only read from iteration 1 on

    def iteration(embeddings, coords, labels, mask_in, multimask, scored):
        low_res, iou_pred = decode(embeddings, image_ids, coords, labels, mask_in, None)
        return low_res, iou_pred, (loss_fn(low_res, iou_pred, gt_masks, multimask) if scored else None)

    grad = torch.is_grad_enabled()
    for t, (new_prompt, scored) in enumerate(zip(schedule, with_loss, strict=True)):
        if new_prompt and t > 0:
            xy, lbl = sample_error_points(pred_s, gt_masks, generator, cfg.click_region)
            clicks_xy = torch.cat([clicks_xy, xy[:, None]], dim=1)
            clicks_lbl = torch.cat([clicks_lbl, lbl[:, None]], dim=1)
        n_prompts = 1 + clicks_xy.shape[1]
        coords, labels = assemble_prompts(is_box, first_xy, boxes, clicks_xy, clicks_lbl)
        mask_in = prev if cfg.feed_mask_prompt else None
        multimask = single_click_multimask(cfg, is_box, n_prompts)
        if scored and grad and checkpoint_iterations:
            low_res, iou_pred, out = checkpoint(
                iteration, image_embeddings, coords, labels, mask_in, multimask, scored, use_reentrant=False
            )
        else:
            with torch.set_grad_enabled(grad and (scored or cfg.loss_iterations is None)):
                low_res, iou_pred, out = iteration(image_embeddings, coords, labels, mask_in, multimask, scored)
        if out is not None:
            losses.append(out)
            total = out["loss"] if total is None else total + out["loss"]
            sel = out["selected"].to(device)
        else:
            sel = best_mask_token(iou_pred, multimask)
        chosen = torch.take_along_dim(low_res, sel[:, None, None, None], dim=1)  # [M, 1, 4h, 4w]
        chosen_iou = torch.take_along_dim(iou_pred, sel[:, None], dim=1)[:, 0]
        prev = chosen.detach()  # SAM: no gradient through the mask prompt
        with torch.no_grad():
            pred_s = upsample_logits(prev.float(), s) > cfg.mask_threshold
            ious.append(mask_iou(pred_s, gt_masks))
        selected.append(sel)
        num_prompts.append(n_prompts)
        if return_all:
            all_logits.append(prev)

    return SimulationResult(
        loss=total,
        losses=losses,
        ious=torch.stack(ious),
        selected=torch.stack(selected),
        num_prompts=num_prompts,
        schedule=schedule,
        with_loss=with_loss,
        low_res_logits=chosen,
        iou_pred=chosen_iou,
        point_coords=coords,
        point_labels=labels,
        is_box=is_box,
        all_logits=torch.stack(all_logits) if return_all else None,
    )
