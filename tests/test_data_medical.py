"""Medical volumes: NIfTI round trip through slices (known labels, spacing, orientation), DICOM series,
intensity normalisation, objects per slice, case-level split, the MNI demo data set."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from filelock import FileLock

from sam_train.data.medical import (
    MedicalSliceDataset,
    reassemble_volume,
    slice_objects,
    split_cases,
    volume_to_image,
)
from sam_train.data.medical_io import normalise_intensity, read_volume
from sam_train.data.mni import prepare_mni_demo
from sam_train.io import preparation_lock

# an oblique-free but non-trivial orientation: x flipped, y and z permuted, anisotropic spacing
AFFINE = np.array([[-0.8, 0, 0, 10.0], [0, 0, 2.0, -5.0], [0, 0.9, 0, 3.0], [0, 0, 0, 1]])


def _label_volume(shape=(12, 10, 9), seed=0):
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    labels[2:6, 2:7, 1:5] = 1
    labels[7:11, 1:4, 5:8] = 2
    labels[7:9, 6:9, 0:3] = 1  # a second component of label 1
    image = rng.normal(100, 20, shape).astype(np.float32) + labels * 50
    return image, labels


def write_msd(root, n_cases=3, *, modality="MRI", affine=AFFINE):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    truth = {}
    for i in range(n_cases):
        image, labels = _label_volume(seed=i)
        case = f"case_{i:03d}"
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"{case}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(labels, affine), str(root / "labelsTr" / f"{case}.nii.gz"))
        truth[case] = labels
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": modality}, "file_ending": ".nii.gz",
                                                  "labels": {"background": 0, "a": 1, "b": 2}}))
    return truth


@pytest.mark.parametrize("orientation,axis", [(None, 0), ("RAS", 2), ("LPS", 1)])
def test_nifti_slices_reassemble_to_the_original(tmp_path, orientation, axis):
    truth = write_msd(tmp_path / "ds", n_cases=2)
    ds = MedicalSliceDataset(tmp_path / "ds", axis=axis, orientation=orientation)
    for case, labels in truth.items():
        slices = [ds[i] for i in range(len(ds)) if ds[i]["case_id"] == case]
        assert all(s["axis"] == axis and s["id"].startswith(case + "/") for s in slices)
        volume = reassemble_volume(slices, shape=ds.volume_shapes[case])
        reference = read_volume(tmp_path / "ds" / "labelsTr" / f"{case}.nii.gz")
        out = tmp_path / f"{case}_{orientation}.nii.gz"
        sitk.WriteImage(volume_to_image(volume.astype(np.uint8), reference, orientation), str(out))
        back = nib.load(str(out))  # read with another library than the one that wrote it
        assert np.array_equal(np.asarray(back.dataobj), labels)
        np.testing.assert_allclose(back.affine, AFFINE, atol=1e-4)
    spacing = ds[0]["spacing"]
    assert sorted(np.round(spacing, 4).tolist()) == [0.8, 0.9, 2.0]


def test_dicom_series_case(tmp_path):
    image, labels = _label_volume()
    ref = sitk.GetImageFromArray(image.astype(np.int16))
    ref.SetSpacing((0.7, 0.7, 1.5))
    series = tmp_path / "ds" / "imagesTr" / "case_000"
    series.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(ref.GetDepth()):
        sl = ref[:, :, z]
        for tag, value in {"0008|0060": "CT", "0020|000e": "1.2.826.0.1.3680043.2.1125.1", "0020|0013": str(z),
                           "0020|0032": "\\".join(map(str, ref.TransformIndexToPhysicalPoint((0, 0, z)))),
                           "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": "0.7\\0.7", "0018|0050": "1.5"}.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(series / f"{z:03d}.dcm"))
        writer.Execute(sl)
    lab = sitk.GetImageFromArray(labels)
    lab.CopyInformation(ref)
    (tmp_path / "ds" / "labelsTr").mkdir()
    sitk.WriteImage(lab, str(tmp_path / "ds" / "labelsTr" / "case_000.nii.gz"))
    ds = MedicalSliceDataset(tmp_path / "ds", modality="CT", ct_window=(100, 200))
    s = ds[0]
    expected = normalise_intensity(image.astype(np.int16), "CT", ct_window=(100, 200))[s["slice_index"]]
    assert np.array_equal(s["image"][0].numpy(), expected)
    assert np.allclose(s["spacing"], (1.5, 0.7, 0.7))


def test_ct_window_and_mr_percentiles():
    ct = np.array([-1000, -160, 40, 240, 1000], np.float32)
    assert normalise_intensity(ct, "CT").tolist() == [0, 0, 128, 255, 255]  # level 40 / width 400
    mr = np.concatenate([np.zeros(50), np.arange(1, 1001)]).astype(np.float32)
    out = normalise_intensity(mr, "MRI", mr_percentiles=(10, 90))
    assert (out[:50] == 0).all()  # background stays 0
    lo, hi = 100.9, 900.1  # 10th / 90th percentile of 1..1000 (linear interpolation)
    expected = np.round((np.clip(mr[50:], lo, hi) - lo) / (hi - lo) * 255)
    assert np.array_equal(out[50:], expected)


def test_slice_objects_components_and_min_area():
    label = np.zeros((10, 10), np.int64)
    label[0:3, 0:3] = 1  # 9 px
    label[6:7, 6:8] = 1  # 2 px, second component
    label[5, 0:5] = 3  # 5 px
    masks, ids = slice_objects(label)
    assert ids.tolist() == [1, 3] and masks.sum((1, 2)).tolist() == [11, 5]
    masks, ids = slice_objects(label, connected_components=True, min_area=3)
    assert ids.tolist() == [1, 3] and masks.sum((1, 2)).tolist() == [9, 5]
    masks, ids = slice_objects(label, connected_components=True, labels=[1])
    assert ids.tolist() == [1, 1]


def test_split_by_case_never_by_slice(tmp_path):
    write_msd(tmp_path / "ds", n_cases=5)
    train_ids, val_ids = split_cases([f"case_{i:03d}" for i in range(5)], 0.4, seed=1)
    assert len(val_ids) == 2 and not set(train_ids) & set(val_ids) and len(train_ids) + len(val_ids) == 5
    assert split_cases(reversed(train_ids + val_ids), 0.4, seed=1) == (train_ids, val_ids)
    train = MedicalSliceDataset(tmp_path / "ds", subset="train", val_fraction=0.4, split_seed=1)
    val = MedicalSliceDataset(tmp_path / "ds", subset="val", val_fraction=0.4, split_seed=1)
    assert train.case_ids == train_ids and val.case_ids == val_ids
    assert {train[i]["case_id"] for i in range(len(train))} == set(train_ids)
    full = MedicalSliceDataset(tmp_path / "ds")
    assert len(train) + len(val) == len(full)


def test_skip_empty_slices(tmp_path):
    truth = write_msd(tmp_path / "ds", n_cases=1)
    labels = truth["case_000"]
    keep = MedicalSliceDataset(tmp_path / "ds", skip_empty=False)
    skip = MedicalSliceDataset(tmp_path / "ds")
    # nibabel indexes (x, y, z); the dataset's array axis 0 is z (SimpleITK order)
    assert len(keep) == labels.shape[2]
    assert len(skip) == int(labels.any(axis=(0, 1)).sum()) < labels.shape[2]
    assert all(skip[i]["masks"].shape[0] > 0 for i in range(len(skip)))


def test_mni_demo_dataset(tmp_path):
    root = prepare_mni_demo(tmp_path / "mni", n_cases=4)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTraining"] == 4 and len(list((root / "labelsTr").glob("*.nii.gz"))) == 4
    ds = MedicalSliceDataset(root, subset="train", val_fraction=0.25)
    assert len(ds.case_ids) == 3
    s = ds[len(ds) // 2]
    assert 64 <= max(s["image"].shape[1:]) <= 96
    assert set(s["class_ids"].tolist()) == {1, 2}  # grey and white matter in a mid-brain slice
    # real anatomy: white matter is brighter than grey matter on T1
    grey = s["image"][0][s["masks"][s["class_ids"] == 1][0]].float().mean()
    white = s["image"][0][s["masks"][s["class_ids"] == 2][0]].float().mean()
    assert white > grey + 10
    assert s["image"].dtype == torch.uint8


def test_ranks_preparing_the_demo_together_wait_for_one_writer(tmp_path):
    # the ranks of a DDP job each build the data config: the image folder (and the MSD set under it) must be
    # written by one of them while the others wait, not read half-written (a CI failure: "unreadable volume")
    msd, images = tmp_path / "mni", tmp_path / "images" / "train"
    # each rank touches a marker as it reaches a lock, so the test knows both are waiting (not still importing)
    code = ("import sys; from pathlib import Path; from filelock import FileLock\n"
            "acquire = FileLock.acquire\n"
            "def reached(self, *a, **k):\n    Path(sys.argv[3]).touch(); return acquire(self, *a, **k)\n"
            "FileLock.acquire = reached\n"
            "from sam_train.data.mni import mni_demo_image_folder\n"
            "out = mni_demo_image_folder(sys.argv[1], msd_dir=sys.argv[2]); print(len(list(Path(out).glob('*.png'))))")
    markers = [tmp_path / f"rank{r}.waiting" for r in range(2)]
    with preparation_lock(images):
        ranks = [subprocess.Popen([sys.executable, "-c", code, str(images), str(msd), str(m)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for m in markers]
        deadline = time.monotonic() + 300
        while not all(m.exists() for m in markers) and time.monotonic() < deadline:
            assert [r.poll() for r in ranks] == [None, None]
            time.sleep(0.2)
        time.sleep(1.0)  # both are at the lock now; give a rank that ignored it time to start writing
        assert all(m.exists() for m in markers)
        assert [r.poll() for r in ranks] == [None, None]
        assert not images.exists() and not msd.exists()  # nobody wrote while another process held the lock
    outs = [r.communicate(timeout=300) for r in ranks]
    assert [r.returncode for r in ranks] == [0, 0], [err[-2000:] for _, err in outs]
    counts = {int(out.split()[-1]) for out, _ in outs}
    assert len(counts) == 1 and counts.pop() > 0  # both see the same complete folder


def test_a_prepared_demo_where_no_lock_can_be_made_is_still_read(tmp_path, monkeypatch):
    root = prepare_mni_demo(tmp_path / "mni", n_cases=2, zoom=0.25)
    before = (root / "dataset.json").stat().st_mtime_ns

    def read_only(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self.lock_file))

    monkeypatch.setattr(FileLock, "acquire", read_only)  # as in a read-only folder (root would ignore chmod)
    assert prepare_mni_demo(root, n_cases=2, zoom=0.25) == root
    assert (root / "dataset.json").stat().st_mtime_ns == before


def test_medical_volumes_to_shards_keep_slice_metadata(tmp_path):
    from sam_train.data.convert import convert
    from sam_train.data.webdataset import ShardDataset

    write_msd(tmp_path / "ds", n_cases=2)
    convert("medical", tmp_path / "ds", tmp_path / "shards", shard_size=5, progress=False)
    ref = {s["id"]: s for s in MedicalSliceDataset(tmp_path / "ds").iter_samples()}
    got = list(ShardDataset(tmp_path / "shards"))
    assert sorted(s["id"] for s in got) == sorted(ref)
    for s in got:
        r = ref[s["id"]]
        assert torch.equal(s["masks"], r["masks"]) and torch.equal(s["image"], r["image"])
        assert (s["case_id"], s["slice_index"], s["spacing"], s["axis"]) == (
            r["case_id"], r["slice_index"], r["spacing"], r["axis"])
