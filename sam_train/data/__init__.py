"""Data layer: readers (COCO, shards, folders, medical volumes), writers, transforms, the DataModule.

Every dataset yields the sample dict of docs/architecture.md; `collate_sam` makes the batch.
Readers with optional dependencies (SimpleITK, nilearn) are imported on first use.
"""

from importlib import import_module

from sam_train.data.sample import DataError, SampleDataset, SkipCounter, collate_sam, make_sample, validate_sample
from sam_train.data.transforms import SamTransform

_LAZY = {
    "CocoDataset": "coco",
    "FolderDataset": "folders",
    "MedicalSliceDataset": "medical",
    "split_cases": "medical",
    "reassemble_volume": "medical",
    "volume_to_image": "medical",
    "ShardDataset": "webdataset",
    "write_shards": "webdataset",
    "convert": "convert",
    "SamDataModule": "datamodule",
    "CachedEmbeddingDataModule": "cached",
    "prepare_mni_demo": "mni",
    "prepare_mni_subcortical": "mni",
    "prepare_mni_neuromorphometrics": "mni",
    "mni_demo_slices": "mni",
    "make_toy_shapes": "toy_shapes",
    "ToyShapesDataset": "toy_shapes",
}

__all__ = ["DataError", "SampleDataset", "SamTransform", "SkipCounter", "collate_sam", "make_sample",
           "validate_sample", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"sam_train.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'sam_train.data' has no attribute {name!r}")
