"""Bad input: each case gives a clear error naming the file and what was expected, or (on_error="skip")
a logged and counted skip; an epoch never stops because of one bad sample."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from test_data_coco import write_coco
from test_data_medical import AFFINE, write_msd
from torch.utils.data import DataLoader

from sam_train.data.coco import CocoDataset
from sam_train.data.folders import FolderDataset
from sam_train.data.medical import MedicalSliceDataset
from sam_train.data.sample import DataError, SkipCounter, collate_sam
from sam_train.data.toy_shapes import make_toy_shapes
from sam_train.data.transforms import SamTransform
from sam_train.data.webdataset import ShardDataset, write_shards


def _edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_missing_image_file(tmp_path, caplog):
    json_path, image_dir = write_coco(tmp_path)
    (image_dir / "img_1.png").unlink()
    with pytest.raises(DataError, match=r"img_1\.png: file not found \(expected an image file\)"):
        CocoDataset(json_path, image_dir)[1]
    ds = CocoDataset(json_path, image_dir, on_error="skip", transform=SamTransform(64))
    with caplog.at_level(logging.WARNING):
        batches = list(DataLoader(ds, batch_size=3, collate_fn=collate_sam))
    assert batches[0]["images"].shape[0] == 3  # the epoch completes, batch size kept
    assert ds.skips.skipped == 1 and list(ds.skips.by_source) == [str(image_dir / "img_1.png")]
    assert "img_1.png: file not found" in caplog.text


def test_unreadable_image(tmp_path):
    json_path, image_dir = write_coco(tmp_path)
    (image_dir / "img_0.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"img_0\.png: unreadable image \(expected PNG/TIFF/JPEG\)"):
        CocoDataset(json_path, image_dir)[0]
    ds = CocoDataset(json_path, image_dir, on_error="skip")
    assert [s["id"] for s in ds.iter_samples()] == ["101", "102"] and ds.skips.skipped == 1


def test_image_mask_size_mismatch(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    Image.fromarray(np.ones((20, 31), np.uint8)).save(tmp_path / "lab" / "a.png")
    with pytest.raises(DataError, match=r"lab/a\.png: mask size 20x31 does not match image .*img/a\.png size 20x30"):
        FolderDataset(tmp_path / "img", tmp_path / "lab")[0]
    # json-declared size vs actual image size (COCO)
    json_path, image_dir = write_coco(tmp_path / "coco")
    _edit_json(json_path, lambda d: d["images"][0].update(height=41))
    with pytest.raises(DataError, match=r"img_0\.png: image size 40x56 does not match 41x56 in .*instances\.json"):
        CocoDataset(json_path, image_dir)[0]


def test_missing_mask_file(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img" / f"{name}.png")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "lab" / "a.png")
    with pytest.raises(DataError, match=r"img/b\.png: missing mask file \(expected .*lab/b\.png\)"):
        FolderDataset(tmp_path / "img", tmp_path / "lab")
    ds = FolderDataset(tmp_path / "img", tmp_path / "lab", on_error="skip")
    assert len(ds) == 1 and ds.skips.skipped == 1


def test_label_geometry_differs_from_image(tmp_path):
    write_msd(tmp_path / "ds", n_cases=3)
    labels = nib.load(str(tmp_path / "ds" / "labelsTr" / "case_001.nii.gz"))
    label_file = str(tmp_path / "ds" / "labelsTr" / "case_001.nii.gz")
    bad_affine = AFFINE.copy()
    bad_affine[2, 1] = 1.0  # spacing 0.9 -> 1.0 along the label's second axis
    nib.save(nib.Nifti1Image(np.asarray(labels.dataobj), bad_affine), label_file)
    with pytest.raises(DataError) as err:
        MedicalSliceDataset(tmp_path / "ds")
    message = str(err.value)
    assert "labelsTr/case_001.nii.gz: label geometry differs from image" in message
    assert "imagesTr/case_001_0000.nii.gz: spacing (0.8, 1.0, 2.0) != (0.8, 0.9, 2.0)" in message
    ds = MedicalSliceDataset(tmp_path / "ds", on_error="skip", max_skip_fraction=0.5)
    assert ds.case_ids == ["case_000", "case_001", "case_002"] and ds.skips.skipped == 1
    assert {ds[i]["case_id"] for i in range(len(ds))} == {"case_000", "case_002"}
    # shape mismatch
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 8), np.uint8), AFFINE), label_file)
    expected = r"case_001\.nii\.gz: label geometry differs .*: shape \(12, 10, 8\) != \(12, 10, 9\)"
    with pytest.raises(DataError, match=expected):
        MedicalSliceDataset(tmp_path / "ds")


def test_missing_medical_image(tmp_path):
    write_msd(tmp_path / "ds", n_cases=2)
    (tmp_path / "ds" / "imagesTr" / "case_001_0000.nii.gz").unlink()
    expected = r"case_001\.nii\.gz: no image for case 'case_001' \(expected .*case_001_0000"
    with pytest.raises(DataError, match=expected):
        MedicalSliceDataset(tmp_path / "ds")


def test_empty_annotation_list(tmp_path):
    json_path, image_dir = write_coco(tmp_path)
    _edit_json(json_path, lambda d: d.update(annotations=[a for a in d["annotations"] if a["image_id"] != 101]))
    with pytest.raises(DataError, match=r"instances\.json: image id 101 \(img_1\.png\): empty annotation list"):
        CocoDataset(json_path, image_dir)
    ds = CocoDataset(json_path, image_dir, on_error="skip", max_skip_fraction=0.5)
    assert len(ds) == 2 and ds.skips.skipped == 1
    # no annotations at all: an error even when skipping
    _edit_json(json_path, lambda d: d.update(annotations=[]))
    with pytest.raises(DataError, match="no image with annotations|too many bad samples"):
        CocoDataset(json_path, image_dir, on_error="skip")


@pytest.mark.parametrize("counts,expected", [
    ([5, 3], r"run lengths sum to 8 .*expected 2240 = 40 x 56"),
    ("0a?", r"invalid character|ends inside a number|run lengths sum"),
])
def test_malformed_rle(tmp_path, counts, expected):
    json_path, image_dir = write_coco(tmp_path)
    _edit_json(json_path, lambda d: d["annotations"][1]["segmentation"].update(counts=counts))
    with pytest.raises(DataError, match=rf"instances\.json \(annotation id 1\): malformed RLE: {expected}"):
        CocoDataset(json_path, image_dir)[0]
    ds = CocoDataset(json_path, image_dir, on_error="skip")
    assert len(list(ds.iter_samples())) == 2 and ds.skips.skipped == 1


def test_malformed_samples_in_shards_are_counted(tmp_path):
    samples = make_toy_shapes(6, 24, torch.Generator().manual_seed(0))
    samples[2]["masks"] = samples[2]["masks"][:0]  # empty annotation list
    samples[2]["class_ids"] = samples[2]["class_ids"][:0]
    write_shards(samples, tmp_path / "s", max_samples_per_shard=3, progress=False)
    ds = ShardDataset(tmp_path / "s", shuffle_buffer=0)
    assert len(list(ds)) == 5 and ds.skips.skipped == 1
    with pytest.raises(DataError, match=r"shard-000000\.tar \(sample 000000002\): empty annotation list"):
        list(ShardDataset(tmp_path / "s", shuffle_buffer=0, on_error="raise"))


def test_truncated_tar_shard(tmp_path):
    samples = make_toy_shapes(9, 24, torch.Generator().manual_seed(0))
    shards = write_shards(samples, tmp_path / "s", max_samples_per_shard=3, progress=False)
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 3])
    ds = ShardDataset(tmp_path / "s", shuffle_buffer=0, max_skip_fraction=0.5)
    ids = [s["id"] for s in ds]
    assert {"toy_00000", "toy_00001", "toy_00002", "toy_00006", "toy_00007", "toy_00008"} <= set(ids)
    assert len(ids) == len(set(ids)) < 9  # the epoch finishes, nothing yielded twice
    assert ds.skips.by_source[str(shards[1])] >= 1
    with pytest.raises(DataError, match=r"shard-000001\.tar: truncated or corrupt tar shard \(expected a complete tar"):
        list(ShardDataset(tmp_path / "s", shuffle_buffer=0, on_error="raise"))


def test_skip_counter_fails_when_most_data_is_bad():
    counter = SkipCounter(on_error="skip", max_skip_fraction=0.2, min_seen=5)
    for _ in range(8):
        counter.ok()
    counter.skip("a.png", "unreadable image")
    counter.skip("b.png", "unreadable image")
    with pytest.raises(DataError, match=r"too many bad samples: 3 of 11 skipped .*last: c\.png: unreadable"):
        counter.skip("c.png", "unreadable image")
    assert counter.by_source == {"a.png": 1, "b.png": 1, "c.png": 1}
