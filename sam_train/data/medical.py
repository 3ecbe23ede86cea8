"""2D slices of 3D medical volumes (MSD / nnU-Net layout, NIfTI or DICOM) as samples, the case-level
train/val split and the reassembly of per-slice labels into 3D volumes for evaluation."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.ndimage
import SimpleITK as sitk
import torch

from sam_train.data.label_maps import assemble_volume, masks_to_label_map
from sam_train.data.medical_io import (
    Case,
    check_geometry,
    find_cases,
    modality_of,
    normalise_intensity,
    read_dataset_json,
    read_volume,
)
from sam_train.data.sample import DataError, OnError, SampleDataset, grey_to_rgb, make_sample

AXIS_NAMES = "zyx"  # array axes of sitk.GetArrayFromImage: axis 0 is the slowest (slice) axis


def split_cases(case_ids: Iterable[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Case-level split (never by slice) -> (train_ids, val_ids), deterministic given `seed`.

    At least one validation case when val_fraction > 0 and there are >= 2 cases.
    """
    ids = sorted(set(case_ids))
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    random.Random(seed).shuffle(ids)
    n_val = 0 if val_fraction == 0 or len(ids) < 2 else min(max(1, round(val_fraction * len(ids))), len(ids) - 1)
    return sorted(ids[n_val:]), sorted(ids[:n_val])


def slice_objects(
    label: np.ndarray,
    *,
    labels: Sequence[int] | None = None,
    connected_components: bool = False,
    min_area: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Label slice int [H, W] -> (masks bool [N, H, W], class_ids int64 [N]).

    One object per label value (or per connected component of it), objects under min_area dropped.
    """
    values = np.unique(label)
    values = values[values != 0]
    if labels is not None:
        values = values[np.isin(values, list(labels))]
    masks, class_ids = [], []
    for value in values:
        region = label == value
        if connected_components:
            components, n = scipy.ndimage.label(region)
            parts = [components == i for i in range(1, n + 1)]
        else:
            parts = [region]
        for part in parts:
            if part.sum() >= max(min_area, 1):
                masks.append(part)
                class_ids.append(int(value))
    if not masks:
        return np.zeros((0, *label.shape), bool), np.zeros(0, np.int64)
    return np.stack(masks), np.asarray(class_ids, np.int64)


def load_case(
    case: Case,
    *,
    channel: int = 0,
    modality: str = "MR",
    orientation: str | None = None,
    ct_window: tuple[float, float] = (40.0, 400.0),
    mr_percentiles: tuple[float, float] = (0.5, 99.5),
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Read, geometry-check and normalise one case -> (image uint8 [Z,Y,X], label int64 [Z,Y,X], spacing zyx)."""
    if case.label is None:
        raise DataError(f"case {case.case_id}: no label volume (expected labelsTr/{case.case_id}.nii.gz)")
    if len(case.images) > 1:  # nnU-Net: one file per channel (<case>_000c)
        if not 0 <= channel < len(case.images):
            raise DataError(
                f"{case.images[0]}: channel {channel} requested, case {case.case_id} has {len(case.images)}"
            )
        image_path, volume_channel = case.images[channel], 0
    else:  # one 3D file, or one 4D file (MSD multi-modal) holding the channels
        image_path, volume_channel = case.images[0], channel
    image = read_volume(image_path, channel=volume_channel)
    label = read_volume(case.label)
    check_geometry(image, label, image_path, case.label)
    if orientation is not None:  # canonical axes, so `axis` means the same anatomical direction for all cases
        image, label = sitk.DICOMOrient(image, orientation), sitk.DICOMOrient(label, orientation)
    label_array = sitk.GetArrayFromImage(label)
    if not np.issubdtype(label_array.dtype, np.integer):
        if not np.all(np.mod(label_array, 1) == 0):
            raise DataError(f"{case.label}: expected integer labels, got non-integer values ({label_array.dtype})")
    volume = normalise_intensity(
        sitk.GetArrayFromImage(image), modality, ct_window=ct_window, mr_percentiles=mr_percentiles
    )
    return volume, label_array.astype(np.int64), tuple(float(s) for s in image.GetSpacing()[::-1])


class MedicalSliceDataset(SampleDataset):
    """Map-style dataset of the non-empty 2D slices of the labelled cases of an MSD / nnU-Net folder.

    Each sample carries `case_id`, `slice_index`, `spacing` (voxel size in mm, array axis order z, y, x)
    and `axis`, so `reassemble_volume` can rebuild 3D volumes for evaluation.

    Args:
        root: dataset folder (imagesTr/, labelsTr/, dataset.json).
        subset: "all", or "train" / "val" of a case-level split_cases(val_fraction, split_seed).
        other_root: the folder of the other subset (the val set's for subset="train", the train set's for
            subset="val"); when given and not `root`, the two sets are separate folders and `subset`
            takes every case of `root` instead of a split.
        cases: explicit case ids to use (applied before `subset`).
        axis: array axis to slice along (0 = slowest axis of the volume; axial for most CT/MR).
        channel: image channel (`_000c` file or 4th dimension) to use.
        modality: "CT" (window) or anything else (percentile); default from dataset.json.
        ct_window: CT (level, width), MedSAM's soft-tissue (40, 400).
        mr_percentiles: foreground percentiles clipped to for non-CT modalities.
        labels: label values to use (default all non-zero).
        connected_components: one object per connected component instead of per label.
        min_area: objects with fewer pixels are dropped.
        skip_empty: drop slices without objects (else they are kept with N = 0 masks).
        orientation: optional DICOM orientation code (e.g. "LPS", "RAS") the volumes are resampled to
            (axes permuted / flipped only) before slicing.
        cache_cases: how many decoded cases each process keeps in memory.
        transform, on_error, max_skip_fraction: as for every SampleDataset; a case that fails to load
            (missing file, geometry mismatch, ...) is an error or a counted skip of all its slices.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        subset: Literal["all", "train", "val"] = "all",
        other_root: str | Path | None = None,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        cases: Sequence[str] | None = None,
        axis: int = 0,
        channel: int = 0,
        modality: str | None = None,
        ct_window: tuple[float, float] = (40.0, 400.0),
        mr_percentiles: tuple[float, float] = (0.5, 99.5),
        labels: Sequence[int] | None = None,
        connected_components: bool = False,
        min_area: int = 0,
        skip_empty: bool = True,
        orientation: str | None = None,
        cache_cases: int = 8,
        transform=None,
        on_error: OnError = "raise",
        max_skip_fraction: float = 0.1,
    ) -> None:
        super().__init__(transform=transform, on_error=on_error, max_skip_fraction=max_skip_fraction)
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
        if subset not in ("all", "train", "val"):
            raise ValueError(f"subset must be 'all', 'train' or 'val', got {subset!r}")
        self.root = Path(root)
        if other_root is not None and Path(other_root).resolve() != self.root.resolve():
            subset = "all"  # separate train / val folders: no split
        self.axis = axis
        self.modality = modality or modality_of(read_dataset_json(self.root), channel)
        self.load_kwargs = dict(
            channel=channel, modality=self.modality, orientation=orientation,
            ct_window=tuple(ct_window), mr_percentiles=tuple(mr_percentiles),
        )
        self.object_kwargs = dict(
            labels=None if labels is None else list(labels), connected_components=connected_components,
            min_area=min_area,
        )
        all_cases = {c.case_id: c for c in find_cases(self.root, "train")}
        if cases is not None:
            missing = sorted(set(cases) - set(all_cases))
            if missing:
                raise DataError(f"{self.root}: cases {missing} not found (known: {sorted(all_cases)[:10]}...)")
            all_cases = {k: all_cases[k] for k in cases}
        if subset != "all":
            train_ids, val_ids = split_cases(all_cases, val_fraction, split_seed)
            all_cases = {k: all_cases[k] for k in (train_ids if subset == "train" else val_ids)}
        self.cases = [all_cases[k] for k in sorted(all_cases)]
        self.cache_cases = cache_cases
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray, tuple[float, ...]]] = OrderedDict()
        self.index: list[tuple[int, int]] = []  # (case index, slice index)
        self.volume_shapes: dict[str, tuple[int, ...]] = {}
        for ci, case in enumerate(self.cases):
            try:
                _, label, _ = self._case(ci)
            except DataError as exc:
                source, _, reason = str(exc).partition(": ")
                self.skips.skip(source, reason, exc)
                continue
            self.skips.ok()
            self.volume_shapes[case.case_id] = label.shape
            for s in range(label.shape[axis]):
                if not skip_empty or slice_objects(np.take(label, s, axis=axis), **self.object_kwargs)[0].shape[0]:
                    self.index.append((ci, s))
        if not self.index:
            raise DataError(f"{self.root}: no labelled slice found in {len(self.cases)} case(s) (subset={subset!r})")

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    def _case(self, ci: int) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
        if ci in self._cache:
            self._cache.move_to_end(ci)
            return self._cache[ci]
        data = load_case(self.cases[ci], **self.load_kwargs)
        self._cache[ci] = data
        while len(self._cache) > max(self.cache_cases, 1):
            self._cache.popitem(last=False)
        return data

    def __len__(self) -> int:
        return len(self.index)

    def source_of(self, index: int) -> str:
        return str(self.cases[self.index[index][0]].images[0])

    def load(self, index: int) -> dict[str, Any]:
        ci, s = self.index[index]
        volume, label, spacing = self._case(ci)
        masks, class_ids = slice_objects(np.take(label, s, axis=self.axis), **self.object_kwargs)
        case = self.cases[ci]
        return make_sample(
            grey_to_rgb(np.ascontiguousarray(np.take(volume, s, axis=self.axis)), str(case.images[0])),
            torch.from_numpy(masks),
            id=f"{case.case_id}/{AXIS_NAMES[self.axis]}{s:03d}",
            source=str(case.images[0]),
            class_ids=torch.from_numpy(class_ids),
            case_id=case.case_id,
            slice_index=s,
            spacing=spacing,
            axis=self.axis,
        )


def reassemble_volume(
    slices: Iterable[Mapping[str, Any]], *, shape: Sequence[int], axis: int | None = None
) -> np.ndarray:
    """Per-slice samples or predictions of ONE case -> int64 label volume of `shape` (zeros elsewhere).

    Each item needs `slice_index`, `masks` bool [N, H, W] at the original slice size and `class_ids` [N]
    (a mask whose class is -1 gets its 1-based position). Later masks overwrite earlier ones
    (`masks_to_label_map`, then `assemble_volume`).
    """
    items = list(slices)
    axes = {item.get("axis") if axis is None else axis for item in items}
    if None in axes or len(axes) > 1:
        raise ValueError("reassemble_volume: pass axis= or give each slice the same 'axis'")
    maps = []
    for item in items:
        masks = torch.as_tensor(item["masks"]).bool()
        class_ids = item.get("class_ids")
        ids = torch.full((len(masks),), -1) if class_ids is None else torch.as_tensor(class_ids).long().cpu()
        ids = torch.where(ids >= 0, ids, torch.arange(1, len(ids) + 1))
        maps.append((int(item["slice_index"]), masks_to_label_map(masks, ids)))
    return assemble_volume(maps, axis=axes.pop() if axes else 0, shape=shape).astype(np.int64)


def volume_to_image(volume: np.ndarray, reference: sitk.Image, orientation: str | None = None) -> sitk.Image:
    """Reassembled array (in the dataset's array space) -> SimpleITK image with `reference`'s geometry,
    undoing the dataset's `orientation` so it can be written next to (and compared with) the original."""
    if orientation is None:
        out = sitk.GetImageFromArray(volume)
        out.CopyInformation(reference)
        return out
    oriented = sitk.DICOMOrient(reference, orientation)
    out = sitk.GetImageFromArray(volume)
    out.CopyInformation(oriented)
    original = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(reference.GetDirection())
    return sitk.DICOMOrient(out, original)
