"""3D evaluation of per-slice predictions on a `MedicalSliceDataset`: reassemble each case's label
volume, save it as NIfTI with the image's geometry, and score it against the case's label volume
(Dice / IoU / NSD / HD95 per class, with the voxel spacing).

Only cases whose every dataset slice was predicted are scored (an evaluation cut short by
`max_batches` would otherwise count the unseen slices as misses); the rest are listed as incomplete.
Slices the dataset leaves out (no object above `min_area`) stay background in the prediction while
the ground truth keeps them: the 3D scores count those voxels as missed.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sam_train.data.label_maps import assemble_volume, masks_to_label_map
from sam_train.eval.evaluate import evaluate_predictions
from sam_train.eval.metrics import METRICS
from sam_train.eval.saving import save_label_volume

log = logging.getLogger(__name__)


def class_names(meta: Mapping[str, Any]) -> dict[int, str]:
    """{label value: name} from a dataset.json "labels" entry (MSD {"1": name} or nnU-Net v2 {name: 1})."""
    out: dict[int, str] = {}
    for key, value in (meta.get("labels") or {}).items():
        if str(key).isdigit():
            out[int(key)] = str(value)
        elif isinstance(value, int):
            out[value] = str(key)
    return out


class VolumeCollector:
    """Collects per-slice predicted label maps of the cases of one MedicalSliceDataset.

    Args:
        dataset: the MedicalSliceDataset the batches come from (its cases, volume shapes, slice index,
            loading options and orientation are used).
    """

    def __init__(self, dataset: Any) -> None:
        from sam_train.data.medical_io import read_dataset_json

        self.dataset = dataset
        self.cases = {c.case_id: c for c in dataset.cases}
        self.expected: dict[str, set[int]] = defaultdict(set)
        for ci, s in dataset.index:
            self.expected[dataset.cases[ci].case_id].add(s)
        self.names = class_names(read_dataset_json(Path(dataset.root)))
        self.slices: dict[str, dict[int, np.ndarray]] = defaultdict(dict)

    @classmethod
    def for_dataset(cls, dataset: Any) -> VolumeCollector | None:
        """A collector for a MedicalSliceDataset; None for any other data set (nothing to reassemble)."""
        from sam_train.data.medical import MedicalSliceDataset

        return cls(dataset) if isinstance(dataset, MedicalSliceDataset) else None

    def add(self, meta: Mapping[str, Any], masks: torch.Tensor, class_ids: torch.Tensor) -> None:
        """One slice: masks bool [N, H, W] at the slice's original size, class_ids [N] (label values)."""
        ids = class_ids if (class_ids >= 1).all() else torch.arange(1, len(masks) + 1)
        self.slices[str(meta["case_id"])][int(meta["slice_index"])] = masks_to_label_map(masks, ids)

    def _save(self, volume: np.ndarray, case_id: str, out: Path) -> Path:
        orientation = self.dataset.load_kwargs.get("orientation")
        label_file = self.cases[case_id].label  # same geometry as the image (checked when loading)
        if orientation is None:
            return save_label_volume(volume, label_file, out)
        import SimpleITK as sitk

        from sam_train.data.medical import volume_to_image

        out.parent.mkdir(parents=True, exist_ok=True)
        image = volume_to_image(volume.astype(np.uint16), sitk.ReadImage(str(label_file)), orientation)
        sitk.WriteImage(image, str(out), useCompression=True)
        return out

    def finish(self, run_dir: Path, opts: Mapping[str, Any]) -> dict[str, Any]:
        """Reassemble, save (`opts["save"]`) and score the complete cases -> evaluate_predictions result
        plus "files" ({case: path}) and "incomplete_cases"."""
        from sam_train.data.medical import load_case

        axis = self.dataset.axis
        complete = sorted(c for c, got in self.slices.items() if self.expected[c] <= set(got))
        incomplete = sorted(set(self.slices) - set(complete))
        if incomplete:
            log.warning("3D metrics skip %d case(s) with unpredicted slices: %s", len(incomplete), incomplete)
        preds, gts, spacing, files = {}, {}, {}, {}
        for case_id in complete:
            _, gt, spacing[case_id] = load_case(self.cases[case_id], **self.dataset.load_kwargs)
            preds[case_id] = assemble_volume(self.slices[case_id].items(), axis=axis, shape=gt.shape)
            gts[case_id] = gt
            if opts.get("save", True):
                out = run_dir / "predictions" / f"{case_id}.nii.gz"
                files[case_id] = str(self._save(preds[case_id], case_id, out))
        restrict = self.dataset.object_kwargs.get("labels")
        values = sorted(
            {int(v) for g in gts.values() for v in np.unique(g) if v != 0} if restrict is None else restrict
        )
        result = (
            evaluate_predictions(
                preds,
                gts,
                classes={v: self.names.get(v, str(v)) for v in values},
                spacing=spacing,
                tolerance_mm=float(opts.get("tolerance_mm", 2.0)),
                metrics=tuple(opts.get("metrics", METRICS)),
                per_slice=bool(opts.get("per_slice", False)),
                slice_axis=axis,
                print_table=False,
            )
            if gts
            else {"per_case": {}, "summary": {"per_class": {}, "overall": {}}}
        )
        return {**result, "files": files, "incomplete_cases": incomplete}
