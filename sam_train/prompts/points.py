"""Point prompts: uniform points inside masks and error-region points, vectorised over objects, and the
deterministic centre click of the evaluation protocol.

The random functions are pure: randomness comes only from the `torch.Generator` argument. Every call
draws exactly one `torch.rand(M, dtype=float64)` from it (the "random stream contract" that the tests'
per-object oracle, tests/prompt_reference.py, replays), so results depend only on the seed and
the number of objects, never on the mask contents. Pass a generator on the masks' device to keep
sampling on the device; a CPU generator also works (its numbers are copied over).

`center_points` is the first click of the interactive evaluation protocol (RITM's clicker, Sofiiuk et al.
2022; SAM's point evaluation): the mask's pixel farthest from its boundary (Euclidean distance transform,
image borders count as boundary). `deepest_pixel` is shared with the corrective clicks of
`sam_train.eval.clicks`.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from sam_train.models.prompt_encoder import NEGATIVE, PAD, POSITIVE


def draw_uniform(m: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """[m] float64 uniforms in [0, 1) from `generator`, placed on `device`."""
    u = torch.rand(m, generator=generator, device=generator.device, dtype=torch.float64)
    return u.to(device, non_blocking=True)


def pick_kth_true(region: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The floor(u * count)-th True pixel of each mask, counting in row-major order.

    Two-level inverse CDF (pick the row from per-row counts, then the column inside that row), so
    memory stays O(M * (H + W)) beyond the masks themselves, with no loop over objects.

    Args:
        region: bool [M, H, W].
        u: float [M] in [0, 1).
    Returns:
        coords float32 [M, 2] as (x, y) pixel indices ((0, 0) where invalid), valid bool [M]
        (False for empty masks).
    """
    if region.dim() != 3:
        raise ValueError(f"region must be bool [M, H, W], got shape {tuple(region.shape)}")
    m = region.shape[0]
    row_counts = region.sum(dim=-1)  # [M, H] int64
    row_cum = row_counts.cumsum(dim=-1)
    total = row_counts.sum(dim=-1)
    valid = total > 0
    k = (u.to(torch.float64) * total).floor().long()
    k = torch.minimum(k, (total - 1).clamp(min=0))  # u*total may round up to total
    # First row whose cumulative count exceeds k holds the k-th pixel.
    row = torch.searchsorted(row_cum, k[:, None], right=True).squeeze(1).clamp(max=region.shape[1] - 1)
    before = torch.gather(row_cum - row_counts, 1, row[:, None]).squeeze(1)  # pixels in earlier rows
    k_in_row = k - before
    row_mask = region[torch.arange(m, device=region.device), row]  # [M, W]
    col_cum = row_mask.long().cumsum(dim=-1)
    col = torch.searchsorted(col_cum, k_in_row[:, None], right=True).squeeze(1).clamp(max=region.shape[2] - 1)
    coords = torch.stack([col, row], dim=-1).to(torch.float32)
    coords = torch.where(valid[:, None], coords, torch.zeros_like(coords))
    return coords, valid


def sample_points(region: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One point per mask, uniform over its True pixels.

    Args:
        region: bool [M, H, W].
        generator: source of randomness (one float64 uniform per object).
    Returns:
        coords float32 [M, 2] (x, y) pixel indices in the mask's frame ((0, 0) for empty masks),
        valid bool [M] (False where the mask is empty).
    """
    u = draw_uniform(region.shape[0], generator, region.device)
    return pick_kth_true(region, u)


def _check_pair(pred: torch.Tensor, gt: torch.Tensor) -> None:
    if pred.shape != gt.shape or pred.dim() != 3:
        raise ValueError(f"pred and gt must both be bool [M, H, W]; got {tuple(pred.shape)} and {tuple(gt.shape)}")


def error_regions(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The region to sample the next click from and its label.

    Rule: the side (false negatives = gt & ~pred, label 1; false positives = pred & ~gt, label 0)
    with more pixels; ties go to false negatives. An object with no error at all gets a positive
    click inside its gt (a click that confirms the mask); an empty gt with no error gets label -1
    (padding, i.e. no click).

    Args:
        pred, gt: bool [M, H, W].
    Returns:
        region bool [M, H, W], labels int64 [M].
    """
    _check_pair(pred, gt)
    pred, gt = pred.bool(), gt.bool()
    fn = gt & ~pred
    fp = pred & ~gt
    n_fn = fn.flatten(1).sum(1)
    n_fp = fp.flatten(1).sum(1)
    positive = n_fn >= n_fp
    no_error = (n_fn + n_fp) == 0
    region = torch.where(positive[:, None, None], fn, fp)
    region = torch.where(no_error[:, None, None], gt, region)
    labels = torch.where(positive | no_error, POSITIVE, NEGATIVE)
    empty = no_error & ~gt.flatten(1).any(1)
    labels = torch.where(empty, PAD, labels).long()
    return region, labels


def inner_error_regions(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RITM's training click region (Sofiiuk et al. 2022): the error side whose deepest pixel is deeper
    (false negatives only when strictly deeper, as the evaluation's clicker decides), restricted to its
    pixels deeper than half that depth, i.e. the interior of the thick errors a user would click. No error:
    as `error_regions`.

    The distance transforms run on the CPU (scipy), one per object and side; the result is on pred's device.

    Args:
        pred, gt: bool [M, H, W].
    Returns:
        region bool [M, H, W], labels int64 [M].
    """
    _check_pair(pred, gt)
    p, g = pred.bool().cpu().numpy(), gt.bool().cpu().numpy()
    regions, labels = np.zeros(p.shape, dtype=bool), np.zeros(p.shape[0], dtype=np.int64)
    for i in range(p.shape[0]):
        depth = {side: depth_map(e) for side, e in ((POSITIVE, g[i] & ~p[i]), (NEGATIVE, p[i] & ~g[i]))}
        deepest = {side: float(d.max()) for side, d in depth.items()}
        if max(deepest.values()) == 0:
            regions[i], labels[i] = g[i], POSITIVE if g[i].any() else PAD
            continue
        side = POSITIVE if deepest[POSITIVE] > deepest[NEGATIVE] else NEGATIVE
        regions[i], labels[i] = depth[side] > deepest[side] / 2, side
    return torch.from_numpy(regions).to(pred.device), torch.from_numpy(labels).to(pred.device)


CLICK_REGIONS = ("error", "inner")


def sample_error_points(
    pred: torch.Tensor, gt: torch.Tensor, generator: torch.Generator, region: str = "error"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A corrective click per object, uniform inside its error region: "error" = the larger error side
    (`error_regions`, the SAM paper), "inner" = the interior of the deeper side (`inner_error_regions`, RITM).

    Args:
        pred: bool [M, H, W] current (thresholded) prediction.
        gt: bool [M, H, W] ground truth.
        generator: source of randomness (one float64 uniform per object).
        region: "error" or "inner".
    Returns:
        coords float32 [M, 2] (x, y) pixel indices, labels int64 [M]: 1 inside a false-negative
        region, 0 inside a false-positive region, -1 (padding) only when gt is empty and
        there is no error.
    """
    if region not in CLICK_REGIONS:
        raise ValueError(f"click region must be one of {CLICK_REGIONS}, got {region!r}")
    where, labels = error_regions(pred, gt) if region == "error" else inner_error_regions(pred, gt)
    coords, _ = sample_points(where, generator)
    return coords, labels


def depth_map(region: np.ndarray) -> np.ndarray:
    """float [H, W] Euclidean distance of each pixel of a bool [H, W] region to the nearest pixel outside
    it, the image border counting as outside (0 off the region)."""
    return ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]


def deepest_pixel(region: np.ndarray) -> tuple[float, int, int]:
    """(depth, x, y) of the pixel of a bool [H, W] region farthest from its boundary: Euclidean distance
    transform, the image border counts as boundary, the first in row-major order on ties; (0, 0, 0) for an
    empty region.

    Computed inside the region's bounding box, zero-padded: identical to the full-image transform (the
    padding ring is background at least as close as any background pixel outside the box).
    """
    rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
    if rows.size == 0:
        return 0.0, 0, 0
    dist = depth_map(region[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    y, x = np.unravel_index(int(dist.argmax()), dist.shape)
    return float(dist[y, x]), int(x + cols[0]), int(y + rows[0])


def center_points(masks: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The centre click of each mask: its deepest pixel (`deepest_pixel`).

    Args:
        masks: bool [M, H, W] (any device; computed on the CPU).
    Returns:
        coords float32 [M, 2] (x, y) pixel indices on the CPU ((0, 0) for empty masks), valid bool [M].
    """
    m = np.asarray(torch.as_tensor(masks).cpu()).astype(bool, copy=False)
    if m.ndim != 3:
        raise ValueError(f"masks must be bool [M, H, W], got shape {tuple(m.shape)}")
    found = [deepest_pixel(mask) for mask in m]
    coords = torch.tensor([[x, y] for _, x, y in found], dtype=torch.float32).reshape(-1, 2)
    return coords, torch.tensor([depth > 0 for depth, _, _ in found], dtype=torch.bool)
