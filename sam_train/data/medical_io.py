"""Medical volumes: MSD / nnU-Net layout discovery, NIfTI and DICOM-series reading (SimpleITK),
image/label geometry checks and per-modality intensity normalisation to uint8.

Layout (Medical Segmentation Decathlon, nnU-Net v1/v2):

    root/dataset.json            {"training": [{"image": ..., "label": ...}], "modality": {"0": "CT"}}
                                 or nnU-Net v2 {"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}
    root/imagesTr/<case>_0000.nii.gz | <case>.nii.gz | <case>/ (a folder holding one DICOM series)
    root/labelsTr/<case>.nii.gz
    root/imagesTs/...            optional, unlabelled
"""

from __future__ import annotations

import json
import locale
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sam_train.data.sample import DataError

VOLUME_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")


@dataclass(frozen=True)
class Case:
    """One case: its id, one image path per channel (file or DICOM folder) and the label path (or None)."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None


def _strip_ending(name: str) -> str | None:
    for ending in VOLUME_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return None


def read_dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid json: {exc}") from exc


def modality_of(meta: dict, channel: int) -> str:
    """Modality name of `channel` from dataset.json ("modality" in MSD, "channel_names" in nnU-Net v2)."""
    names = meta.get("modality") or meta.get("channel_names") or {}
    return str(names.get(str(channel), "MR"))


def _images_for(images_dir: Path, case_id: str) -> tuple[Path, ...]:
    if (images_dir / case_id).is_dir():
        return (images_dir / case_id,)
    for ending in VOLUME_ENDINGS:
        channels = sorted(images_dir.glob(f"{case_id}_[0-9][0-9][0-9][0-9]{ending}"))
        if channels:
            return tuple(channels)
        if (images_dir / f"{case_id}{ending}").is_file():
            return (images_dir / f"{case_id}{ending}",)
    return ()


def find_cases(root: str | Path, split: str = "train") -> list[Case]:
    """Cases of an MSD / nnU-Net folder. split "train" (imagesTr + labelsTr) or "test" (imagesTs).

    A case whose image is missing raises a DataError naming the expected file names.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found (expected imagesTr/, labelsTr/, dataset.json)")
    meta = read_dataset_json(root)
    images_dir = root / ("imagesTr" if split == "train" else "imagesTs")
    if split == "train" and isinstance(meta.get("training"), list) and meta["training"]:
        cases = []
        for entry in meta["training"]:
            label = root / entry["label"]
            case_id = _strip_ending(label.name) or label.name
            image = root / entry["image"]
            images = (image,) if image.exists() else _images_for(images_dir, case_id)
            cases.append(Case(case_id, images or (image,), label))
        return cases
    if split == "train":
        labels_dir = root / "labelsTr"
        if not labels_dir.is_dir():
            raise DataError(f"{labels_dir}: folder not found (expected one label volume per training case)")
        cases = []
        for label in sorted(labels_dir.iterdir()):
            case_id = _strip_ending(label.name)
            if case_id is None:
                continue
            images = _images_for(images_dir, case_id)
            if not images:
                raise DataError(
                    f"{label}: no image for case {case_id!r} (expected {images_dir}/{case_id}_0000.nii.gz, "
                    f"{images_dir}/{case_id}.nii.gz or a DICOM folder {images_dir}/{case_id}/)"
                )
            cases.append(Case(case_id, images, label))
        return cases
    if not images_dir.is_dir():
        return []
    ids = sorted({(_strip_ending(p.name) or p.name).rsplit("_", 1)[0] if p.is_file() else p.name
                  for p in images_dir.iterdir()})
    return [Case(case_id, _images_for(images_dir, case_id), None) for case_id in ids]


@contextmanager
def preserved_locale() -> Iterator[None]:
    """GDCM (SimpleITK's DICOM I/O) switches the process locale to "C", which turns Python's default
    text encoding into ASCII for the rest of the process; put the caller's locale back."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def read_volume(path: str | Path, channel: int = 0) -> sitk.Image:
    """NIfTI / MHA / NRRD file or DICOM-series folder -> 3D SimpleITK image (4D: `channel` extracted)."""
    path = Path(path)
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        with preserved_locale():
            names = reader.GetGDCMSeriesFileNames(str(path))
        if not names:
            raise DataError(f"{path}: no DICOM series found (expected a folder of DICOM slices)")
        reader.SetFileNames(names)
        try:
            with preserved_locale():
                image = reader.Execute()
        except RuntimeError as exc:
            raise DataError(f"{path}: unreadable DICOM series: {str(exc).strip().splitlines()[-1]}") from exc
    elif not path.is_file():
        raise DataError(f"{path}: file not found (expected a NIfTI volume or a DICOM folder)")
    else:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise DataError(
                f"{path}: unreadable volume (expected NIfTI .nii/.nii.gz, MHA, NRRD): "
                f"{str(exc).strip().splitlines()[-1]}"
            ) from exc
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        if not 0 <= channel < size[3]:
            raise DataError(f"{path}: channel {channel} requested, volume has {size[3]}")
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, channel])
    if image.GetDimension() != 3:
        raise DataError(f"{path}: expected a 3D volume, got {image.GetDimension()}D")
    return image


def _fmt(values) -> tuple:
    return tuple(v if isinstance(v, int) else round(float(v), 4) for v in values)


def check_geometry(image: sitk.Image, label: sitk.Image, image_path: Path, label_path: Path) -> None:
    """Raise DataError naming the label file unless label and image share shape, spacing, origin, direction
    (all printed in SimpleITK / NIfTI (x, y, z) order)."""
    checks = (
        ("shape", image.GetSize(), label.GetSize(), 0.0),
        ("spacing", image.GetSpacing(), label.GetSpacing(), 1e-4),
        ("origin", image.GetOrigin(), label.GetOrigin(), 1e-3),
        ("orientation", image.GetDirection(), label.GetDirection(), 1e-4),
    )
    for name, want, got, tol in checks:
        if len(want) != len(got) or not np.allclose(want, got, rtol=0, atol=tol):
            raise DataError(
                f"{label_path}: label geometry differs from image {image_path}: {name} {_fmt(got)} != {_fmt(want)}"
            )


def normalise_intensity(
    volume: np.ndarray,
    modality: str,
    *,
    ct_window: tuple[float, float] = (40.0, 400.0),
    mr_percentiles: tuple[float, float] = (0.5, 99.5),
) -> np.ndarray:
    """Volume (any dtype) -> uint8. CT: window (level, width) -> [0, 255]. Anything else (MR, ...):
    clip to the percentiles of the foreground (non-zero voxels), scale, background kept at 0 (MedSAM)."""
    v = volume.astype(np.float32)
    if modality.upper() == "CT":
        level, width = ct_window
        lo, hi = level - width / 2, level + width / 2
        return np.round((np.clip(v, lo, hi) - lo) / (hi - lo) * 255).astype(np.uint8)
    foreground = v[v != 0]
    if foreground.size == 0:
        return np.zeros(v.shape, np.uint8)
    lo, hi = np.percentile(foreground, mr_percentiles)
    out = np.zeros(v.shape, np.float32) if hi <= lo else (np.clip(v, lo, hi) - lo) / (hi - lo) * 255
    out[v == 0] = 0
    return np.round(out).astype(np.uint8)
