"""Generated toy data (not real images): random ellipses / rectangles / triangles on noise with their
instance masks, as a list of samples (`make_toy_shapes`) or a dataset (`ToyShapesDataset`).

Real (MNI152) data for the demos is `sam_train.data.mni`."""

from __future__ import annotations

from typing import Any

import torch

from sam_train.data.sample import SampleDataset, make_sample


def _shape_mask(kind: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """bool [h, w]: 0 ellipse, 1 rectangle, 2 triangle, random position and size."""
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    r = torch.rand(6, generator=g)
    cy, cx = 0.15 * h + 0.7 * h * r[0], 0.15 * w + 0.7 * w * r[1]
    ry, rx = (0.08 + 0.2 * r[2]) * h, (0.08 + 0.2 * r[3]) * w
    if kind == 0:
        return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
    if kind == 1:
        return ((y - cy).abs() <= ry) & ((x - cx).abs() <= rx)
    angles = torch.tensor([0.0, 2.1, 4.2]) + 6.28 * r[4]
    py, px = cy + ry * torch.sin(angles), cx + rx * torch.cos(angles)
    inside = torch.ones(h, w, dtype=torch.bool)
    orient = torch.sign((px[1] - px[0]) * (py[2] - py[0]) - (py[1] - py[0]) * (px[2] - px[0]))
    for i in range(3):  # inside = on the same side of all three edges
        j = (i + 1) % 3
        cross = (px[j] - px[i]) * (y - py[i]) - (py[j] - py[i]) * (x - px[i])
        inside &= cross * orient >= 0
    return inside


def make_toy_shapes(
    n: int, size: int | tuple[int, int] = 64, generator: torch.Generator | None = None, *, max_objects: int = 4
) -> list[dict[str, Any]]:
    """n samples of random ellipses / rectangles / triangles on noise, with their visible instance masks.

    Each sample: image uint8 [3, H, W], masks bool [N, H, W] (1 <= N <= max_objects, non-overlapping,
    later shapes occlude earlier ones), class_ids int64 [N] (0 ellipse, 1 rectangle, 2 triangle).
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    h, w = (size, size) if isinstance(size, int) else size
    samples = []
    for i in range(n):
        image = (torch.rand(3, h, w, generator=g) * 60 + 40).to(torch.uint8)
        count = int(torch.randint(1, max_objects + 1, (), generator=g))
        masks, kinds = [], []
        for _ in range(count):
            kind = int(torch.randint(0, 3, (), generator=g))
            mask = _shape_mask(kind, h, w, g)
            colour = (torch.rand(3, generator=g) * 120 + 130).to(torch.uint8)
            image[:, mask] = colour[:, None]
            masks = [m & ~mask for m in masks]  # occluded parts belong to the new shape
            masks.append(mask)
            kinds.append(kind)
        keep = [k for k, m in enumerate(masks) if m.sum() >= 4]
        samples.append(make_sample(
            image, torch.stack([masks[k] for k in keep]), id=f"toy_{i:05d}", source="make_toy_shapes",
            class_ids=torch.tensor([kinds[k] for k in keep], dtype=torch.int64),
        ))
    return samples


class ToyShapesDataset(SampleDataset):
    """`n` images of random shapes on noise with their instance masks, generated once from `seed`.

    Args:
        n: number of images.
        size: image side in pixels.
        seed: generator seed (train and val sets use different seeds).
        max_objects: shapes per image (1..max_objects).
        transform: usually a `SamTransform`.
    """

    def __init__(self, *, n: int, size: int = 64, seed: int = 0, max_objects: int = 4, transform=None) -> None:
        super().__init__(transform=transform)
        self.samples = make_toy_shapes(n, size, torch.Generator().manual_seed(seed), max_objects=max_objects)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> dict[str, Any]:
        return dict(self.samples[index])

    def source_of(self, index: int) -> str:
        return f"make_toy_shapes[{index}]"
