"""Saved predictions reload with their image's geometry; 2D PNG / COCO RLE round trips; assembly."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from pycocotools import mask as mask_utils

from sam_train.data.label_maps import assemble_volume, masks_to_label_map
from sam_train.eval.saving import (
    case_id_of,
    load_coco_rle,
    load_label_volume,
    load_png_labels,
    read_geometry,
    save_coco_rle,
    save_label_volume,
    save_png_labels,
)

SPACING = (0.7, 0.9, 2.5)  # x, y, z (SimpleITK order)
ORIGIN = (-10.0, 5.5, 3.25)


def _rotation() -> tuple[float, ...]:
    c, s = np.cos(0.3), np.sin(0.3)
    return tuple(np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).ravel().tolist())


def make_reference(path, shape_zyx=(6, 10, 12), spacing=SPACING, origin=ORIGIN) -> str:
    """A CT-like float image with anisotropic spacing and a rotated direction."""
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(0, 100, shape_zyx).astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(_rotation())
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return str(path)


def test_label_volume_keeps_reference_geometry(tmp_path):
    ref = make_reference(tmp_path / "img" / "case_7_0000.nii.gz")
    labels = np.zeros((6, 10, 12), np.int64)
    labels[1:4, 2:6, 3:9] = 1
    labels[4, 5:8, 1:3] = 3
    out = save_label_volume(torch.from_numpy(labels), ref, tmp_path / "pred" / "case_7.nii.gz")
    back, geom = load_label_volume(out)
    assert np.array_equal(back, labels) and back.dtype == np.uint8
    ref_image = sitk.ReadImage(ref)
    assert geom.size == ref_image.GetSize() == (12, 10, 6)
    assert np.allclose(geom.spacing, ref_image.GetSpacing()) and np.allclose(geom.origin, ORIGIN)
    assert np.allclose(geom.direction, _rotation(), atol=1e-6)
    assert geom.allclose(read_geometry(ref)) and geom.spacing_zyx == pytest.approx(SPACING[::-1])
    # an independent reader (nibabel) sees the same grid and the same voxel-to-world affine
    pred_nii, ref_nii = nib.load(out), nib.load(ref)
    assert pred_nii.shape == ref_nii.shape == (12, 10, 6)
    assert np.allclose(pred_nii.header.get_zooms(), SPACING)
    assert np.allclose(pred_nii.affine, ref_nii.affine, atol=1e-5)
    assert np.array_equal(np.asarray(pred_nii.dataobj).transpose(2, 1, 0), labels)
    assert case_id_of(out) == "case_7"


def test_label_volume_errors(tmp_path):
    ref = make_reference(tmp_path / "ref.nii.gz")
    with pytest.raises(ValueError, match=r"ref\.nii\.gz"):
        save_label_volume(np.zeros((10, 6, 12), np.uint8), ref, tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="integer"):
        save_label_volume(np.zeros((6, 10, 12), np.float32), ref, tmp_path / "x.nii.gz")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_label_volume(tmp_path / "missing.nii.gz")
    big = np.zeros((6, 10, 12), np.int32)
    big[0, 0, 0] = 300
    back, _ = load_label_volume(save_label_volume(big, ref, tmp_path / "big.nii.gz"))
    assert back[0, 0, 0] == 300 and back.dtype == np.uint16


def test_assemble_volume_along_any_axis():
    rng = np.random.default_rng(1)
    vol = rng.integers(0, 3, size=(5, 4, 6))
    for axis in range(3):
        slices = [(k, np.take(vol, k, axis=axis)) for k in range(vol.shape[axis])]
        rng.shuffle(slices)
        assert np.array_equal(assemble_volume(slices, axis=axis, shape=vol.shape), vol)
    partial = assemble_volume([(2, torch.from_numpy(vol[:, 2]))], axis=1, shape=vol.shape)
    assert np.array_equal(partial[:, 2], vol[:, 2]) and not partial[:, [0, 1, 3]].any()
    with pytest.raises(ValueError, match="twice"):
        assemble_volume([(1, vol[1]), (1, vol[1])], axis=0, shape=vol.shape)
    with pytest.raises(ValueError, match="shape"):
        assemble_volume([(1, vol[1, :2])], axis=0, shape=vol.shape)
    with pytest.raises(ValueError, match="out of range"):
        assemble_volume([(5, vol[0])], axis=0, shape=vol.shape)


def test_masks_to_label_map_overlap_rules():
    masks = np.zeros((3, 4, 4), bool)
    masks[0, :2] = True
    masks[1, 1:3] = True
    masks[2, 3, 3] = True
    later_wins = masks_to_label_map(masks, [1, 2, 5])
    assert later_wins[:, 0].tolist() == [1, 2, 2, 0] and later_wins[3, 3] == 5
    by_score = masks_to_label_map(torch.from_numpy(masks), torch.tensor([1, 2, 5]), scores=[0.9, 0.1, 0.5])
    assert by_score[:, 0].tolist() == [1, 1, 2, 0]
    with pytest.raises(ValueError, match=">= 1"):
        masks_to_label_map(masks, [0, 1, 2])


def test_png_labels_round_trip(tmp_path):
    labels = np.zeros((7, 9), np.int64)
    labels[1:3, 2:5] = 4
    assert np.array_equal(load_png_labels(save_png_labels(labels, tmp_path / "a.png")), labels)
    labels[5, 5] = 300  # needs 16 bits
    assert np.array_equal(load_png_labels(save_png_labels(labels, tmp_path / "b.png")), labels)


def test_coco_rle_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    masks = [rng.random((2, 8, 11)) > 0.5, torch.from_numpy(rng.random((1, 5, 6)) > 0.3)]
    path = save_coco_rle(masks, [17, 42], tmp_path / "res.json", category_ids=[[1, 3], [2]], scores=[[0.9, 0.4], [1.0]])
    anns = load_coco_rle(path)
    assert [a["image_id"] for a in anns] == [17, 17, 42] and [a["category_id"] for a in anns] == [1, 3, 2]
    expected = [masks[0][0], masks[0][1], masks[1][0].numpy()]
    for ann, m in zip(anns, expected, strict=True):
        assert np.array_equal(ann["mask"], m) and ann["segmentation"]["size"] == list(m.shape)
        rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
        assert mask_utils.area(rle) == m.sum()
    with pytest.raises(ValueError, match="image 5"):
        save_coco_rle([np.zeros((2, 2), bool)], [5], tmp_path / "bad.json")
