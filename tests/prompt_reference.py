"""Test oracle: a per-object reference of `simulate`, a plain Python loop, one object per decoder call.

Used by the tests to show that the batched loop gives the same prompts, masks
and losses. It replays the random stream contract of `sam_train.prompts.interactive` with the
same draws, but samples points, boxes and error regions with its own simple per-object code
(`nonzero` lists instead of cumulative-sum searches) and builds each object's prompt as the
official predictor would (clicks, then the box or one padding point). It is slow by design.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sam_train.losses.functional import mask_iou
from sam_train.models.prompt_encoder import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT, NEGATIVE, PAD, POSITIVE
from sam_train.prompts.interactive import (
    DecodeFn,
    LossFn,
    PromptSimulationConfig,
    SimulationResult,
    iteration_schedule,
)


def _kth_pixel(region: torch.Tensor, u: float) -> tuple[float, float]:
    """(x, y) of the floor(u * count)-th True pixel of a [H, W] mask in row-major order."""
    yx = torch.nonzero(region)
    if len(yx) == 0:
        return 0.0, 0.0
    k = min(int(u * len(yx)), len(yx) - 1)
    return float(yx[k, 1]), float(yx[k, 0])


def _box(mask: torch.Tensor, z: torch.Tensor, cfg: PromptSimulationConfig, size: tuple[int, int]) -> list[float]:
    yx = torch.nonzero(mask)
    x0, y0, x1, y1 = (float(v) for v in (yx[:, 1].min(), yx[:, 0].min(), yx[:, 1].max(), yx[:, 0].max()))
    if cfg.box_jitter == "gaussian":
        w, h = x1 - x0, y1 - y0
        d = [
            max(-cfg.box_max_noise, min(cfg.box_max_noise, float(zi) * cfg.box_noise_std * side))
            for zi, side in zip(z.tolist(), (w, h, w, h), strict=True)
        ]
        x0, y0, x1, y1 = x0 + d[0], y0 + d[1], x1 + d[2], y1 + d[3]
        x0, x1 = min(x0, x1), max(x0, x1)
        y0, y1 = min(y0, y1), max(y0, y1)
    elif cfg.box_jitter == "uniform_expand":
        x0, y0, x1, y1 = x0 - float(z[0]), y0 - float(z[1]), x1 + float(z[2]), y1 + float(z[3])
    if cfg.box_jitter != "none":
        x0, x1 = (min(max(v, 0.0), size[1] - 1.0) for v in (x0, x1))
        y0, y1 = (min(max(v, 0.0), size[0] - 1.0) for v in (y0, y1))
    return [x0, y0, x1, y1]


def _error_click(pred: torch.Tensor, gt: torch.Tensor, u: float) -> tuple[float, float, int]:
    fn, fp = gt & ~pred, pred & ~gt
    n_fn, n_fp = int(fn.sum()), int(fp.sum())
    if n_fn + n_fp == 0:
        x, y = _kth_pixel(gt, u)
        return x, y, POSITIVE if bool(gt.any()) else PAD
    if n_fn >= n_fp:
        return (*_kth_pixel(fn, u), POSITIVE)
    return (*_kth_pixel(fp, u), NEGATIVE)


def per_object_reference(
    decode: DecodeFn,
    image_embeddings: torch.Tensor,
    gt_masks: torch.Tensor,
    image_ids: torch.Tensor,
    cfg: PromptSimulationConfig,
    generator: torch.Generator,
    *,
    loss_fn: LossFn | None = None,
    image_sizes: torch.Tensor | None = None,
) -> SimulationResult:
    """`simulate` with a Python loop over objects (same arguments; loss_fn gets one object at a time)."""
    m, s = gt_masks.shape[0], gt_masks.shape[-1]
    dev = generator.device
    schedule = iteration_schedule(cfg, generator)
    is_box = (torch.rand(m, generator=generator, device=dev, dtype=torch.float64) < cfg.box_probability).tolist()
    u_first = torch.rand(m, generator=generator, device=dev, dtype=torch.float64).tolist()
    if cfg.box_jitter == "gaussian":
        z = torch.randn(m, 4, generator=generator, device=dev)
    elif cfg.box_jitter == "uniform_expand":
        z = torch.randint(0, cfg.box_max_shift + 1, (m, 4), generator=generator, device=dev)
    else:
        z = torch.zeros(m, 4)
    sizes = [(s, s) if image_sizes is None else tuple(int(v) for v in image_sizes[int(image_ids[i])]) for i in range(m)]
    clicks: list[list[tuple[float, float, int]]] = []
    boxes: list[list[float]] = []
    for i in range(m):
        clicks.append([] if is_box[i] else [(*_kth_pixel(gt_masks[i], u_first[i]), POSITIVE)])
        boxes.append(_box(gt_masks[i], z[i], cfg, sizes[i]))  # type: ignore[arg-type]

    total = None
    losses, ious, selected, num_prompts, preds = [], [], [], [], [None] * m
    prev: list[torch.Tensor | None] = [None] * m
    for t, new_prompt in enumerate(schedule):
        if new_prompt and t > 0:
            u = torch.rand(m, generator=generator, device=dev, dtype=torch.float64).tolist()
            for i in range(m):
                clicks[i].append(_error_click(preds[i], gt_masks[i], u[i]))
        num_prompts.append(len(clicks[0]) + int(is_box[0]))
        step_loss = None
        it_iou, it_sel, chosen_all, chosen_iou_all, coords_all, labels_all = [], [], [], [], [], []
        for i in range(m):
            pts = [(x, y) for x, y, _ in clicks[i]]
            lbl = [label for _, _, label in clicks[i]]
            if is_box[i]:
                pts += [(boxes[i][0], boxes[i][1]), (boxes[i][2], boxes[i][3])]
                lbl += [BOX_TOP_LEFT, BOX_BOTTOM_RIGHT]
            else:
                pts.append((0.0, 0.0))
                lbl.append(PAD)
            coords = torch.tensor([pts], dtype=torch.float32, device=gt_masks.device)
            labels = torch.tensor([lbl], dtype=torch.long, device=gt_masks.device)
            mask_in = prev[i] if cfg.feed_mask_prompt else None
            low_res, iou_pred = decode(image_embeddings, image_ids[i : i + 1], coords, labels, mask_in, None)
            multi = cfg.multimask_for_single_point and not is_box[i] and len(clicks[i]) == 1
            if loss_fn is not None:
                out = loss_fn(low_res, iou_pred, gt_masks[i : i + 1], multi)
                step_loss = out["loss"] if step_loss is None else step_loss + out["loss"]
                sel = int(out["selected"][0])
            else:
                sel = int(iou_pred[0, 1:].argmax()) + 1 if multi else 0
            chosen = low_res[:, sel : sel + 1]
            prev[i] = chosen.detach()
            up = F.interpolate(prev[i].float(), size=(s, s), mode="bilinear", align_corners=False)[0, 0]
            preds[i] = up > cfg.mask_threshold
            it_iou.append(mask_iou(preds[i], gt_masks[i]))
            it_sel.append(sel)
            chosen_all.append(chosen)
            chosen_iou_all.append(iou_pred[0, sel])
            coords_all.append(coords)
            labels_all.append(labels)
        if step_loss is not None:
            losses.append({"loss": step_loss})
            total = step_loss if total is None else total + step_loss
        ious.append(torch.stack(it_iou))
        selected.append(torch.tensor(it_sel))

    return SimulationResult(
        loss=total,
        losses=losses,
        ious=torch.stack(ious),
        selected=torch.stack(selected),
        num_prompts=num_prompts,
        schedule=schedule,
        with_loss=[loss_fn is not None] * len(schedule),
        low_res_logits=torch.cat(chosen_all),
        iou_pred=torch.stack(chosen_iou_all),
        point_coords=torch.cat(coords_all),
        point_labels=torch.cat(labels_all),
        is_box=torch.tensor(is_box),
    )
