"""Saving predictions so any tool can open them and recompute the metrics.

- Medical volumes: one label volume per case (NIfTI, .nii.gz) carrying the reference image's exact
  geometry (size, spacing, origin, direction), so it overlays the image in 3D Slicer / ITK-SNAP.
  Arrays are numpy z-y-x (SimpleITK's `GetArrayFromImage` order); SimpleITK's own spacing is x-y-z.
- 2D data: PNG label images (uint8, or 16-bit when labels exceed 255) or a COCO results json with
  compressed RLE masks (`sam_train.data.rle.encode_masks`).
Label maps and volumes of per-object / per-slice predictions are built by `sam_train.data.label_maps`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sam_train.data.label_maps import label_dtype
from sam_train.data.rle import decode_segmentation, encode_masks

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass(frozen=True)
class Geometry:
    """Image geometry in SimpleITK (x-y-z) order; `spacing_zyx` matches numpy arrays."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.size))

    @property
    def spacing_zyx(self) -> tuple[float, ...]:
        return tuple(reversed(self.spacing))

    def allclose(self, other: Geometry, atol: float = 1e-5) -> bool:
        return self.size == other.size and all(
            np.allclose(a, b, atol=atol)
            for a, b in ((self.spacing, other.spacing), (self.origin, other.origin), (self.direction, other.direction))
        )


def _geometry(image) -> Geometry:
    return Geometry(
        tuple(int(v) for v in image.GetSize()),
        tuple(float(v) for v in image.GetSpacing()),
        tuple(float(v) for v in image.GetOrigin()),
        tuple(float(v) for v in image.GetDirection()),
    )


def read_geometry(path: str | Path) -> Geometry:
    """Geometry of an image file, read from its header only."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return _geometry(reader)


def case_id_of(path: str | Path) -> str:
    """File name without its volume suffix: 'case_003.nii.gz' -> 'case_003'."""
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def save_label_volume(labels: np.ndarray | torch.Tensor, reference_image: str | Path, out_path: str | Path) -> Path:
    """Write a label volume with the geometry of `reference_image` (any SimpleITK-readable file).

    Args:
        labels: int [D, H, W] in numpy z-y-x order, the shape of the reference image's array.
        reference_image: the image the labels belong to; its spacing, origin and direction are copied.
        out_path: output file; .nii.gz recommended.
    """
    import SimpleITK as sitk

    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    ref = read_geometry(reference_image)
    if labels.shape != ref.shape:
        raise ValueError(
            f"labels of shape {labels.shape} (z, y, x) do not match reference image {reference_image} "
            f"with array shape {ref.shape}"
        )
    image = sitk.GetImageFromArray(labels.astype(label_dtype(labels, str(out_path))))
    image.SetSpacing(ref.spacing)
    image.SetOrigin(ref.origin)
    image.SetDirection(ref.direction)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(out_path), useCompression=True)
    return out_path


def load_label_volume(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a label volume -> (int array [D, H, W] z-y-x, its Geometry)."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label volume {path} does not exist")
    image = sitk.ReadImage(str(path))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: a label volume must have one component per voxel")
    array = sitk.GetArrayFromImage(image)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise ValueError(f"{path}: label volume holds non-integer values (dtype {array.dtype})")
        array = array.astype(np.int64)
    return array, _geometry(image)


def save_png_labels(labels: np.ndarray | torch.Tensor, path: str | Path) -> Path:
    """Write an int [H, W] label map as a PNG (8-bit, or 16-bit when labels exceed 255)."""
    from PIL import Image

    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{path}: a PNG label image needs a [H, W] label map, got shape {labels.shape}")
    dtype = label_dtype(labels, str(path))
    if dtype == np.uint32:
        raise ValueError(f"{path}: PNG holds labels up to 65535, got {labels.max()}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(dtype)).save(path)
    return path


def load_png_labels(path: str | Path) -> np.ndarray:
    """Read a PNG label image -> int [H, W]."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im).astype(np.int64)


def save_coco_rle(
    masks: Sequence[np.ndarray | torch.Tensor],
    image_ids: Sequence[int | str],
    path: str | Path,
    *,
    category_ids: Sequence[Sequence[int]] | None = None,
    scores: Sequence[Sequence[float]] | None = None,
) -> Path:
    """Write predictions in the COCO results format (a json list of annotations with RLE masks).

    Args:
        masks: per image, bool [N_i, H, W].
        image_ids: per image, its COCO image id.
        category_ids: per image, [N_i] category ids (default 1).
        scores: per image, [N_i] confidences (default 1.0).
    """
    if len(masks) != len(image_ids):
        raise ValueError(f"got {len(masks)} mask stacks for {len(image_ids)} image ids")
    results = []
    for i, (image_masks, image_id) in enumerate(zip(masks, image_ids, strict=True)):
        m = image_masks.cpu().numpy() if isinstance(image_masks, torch.Tensor) else np.asarray(image_masks)
        if m.ndim != 3 or m.dtype != bool:
            raise ValueError(f"masks[{i}] (image {image_id}): expected bool [N, H, W], got {m.dtype}{m.shape}")
        for j, rle in enumerate(encode_masks(m)):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(category_ids[i][j]) if category_ids is not None else 1,
                    "segmentation": rle,
                    "score": float(scores[i][j]) if scores is not None else 1.0,
                }
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
    return path


def load_coco_rle(path: str | Path) -> list[dict]:
    """Read a COCO results json -> list of annotations, each with `mask` bool [H, W] decoded."""
    out = []
    for ann in json.loads(Path(path).read_text()):
        seg = ann["segmentation"]
        out.append(dict(ann, mask=decode_segmentation(seg, *seg["size"], f"{path} (image {ann.get('image_id')})")))
    return out
