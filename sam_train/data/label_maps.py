"""Label maps: per-object masks -> one label map, per-slice label maps -> a case volume, and the smallest
unsigned dtype that holds a label map.

Plain numpy / torch (no SimpleITK), so 2D evaluation can write label PNGs without the medical extras;
`sam_train.data.medical.reassemble_volume` composes them for a data set's slices, and `sam_train.eval`
saves and scores what they build.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch


def label_dtype(labels: np.ndarray, where: str) -> np.dtype:
    """The smallest unsigned dtype (uint8 / uint16 / uint32) that holds integer labels >= 0."""
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"{where}: labels must be an integer array, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{where}: labels must be >= 0, got minimum {labels.min()}")
    high = int(labels.max()) if labels.size else 0
    return np.dtype(np.uint8 if high < 256 else np.uint16 if high < 65536 else np.uint32)


def masks_to_label_map(
    masks: np.ndarray | torch.Tensor, class_ids: Sequence[int] | torch.Tensor, scores: Sequence[float] | None = None
) -> np.ndarray:
    """Per-object masks -> one label map. masks: bool [N, H, W]; class_ids: [N] (label value of each,
    >= 1). Where masks overlap the higher-scoring object wins (or the later one when no scores)."""
    masks = masks.cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    ids = np.asarray(torch.as_tensor(class_ids).cpu()).astype(np.int64)
    if masks.ndim != 3 or masks.dtype != bool or len(ids) != len(masks):
        raise ValueError(f"need bool masks [N, H, W] and N class ids, got {masks.dtype}{masks.shape} and {len(ids)}")
    if len(ids) and ids.min() < 1:
        raise ValueError(f"class ids must be >= 1 (0 is background), got {ids.tolist()}")
    order = np.argsort(np.asarray(scores), kind="stable") if scores is not None else np.arange(len(masks))
    out = np.zeros(masks.shape[1:], dtype=label_dtype(ids, "class_ids"))
    for i in order:  # ascending: the best-scoring object is painted last
        out[masks[i]] = ids[i]
    return out


def assemble_volume(
    slices: Iterable[tuple[int, np.ndarray | torch.Tensor]], *, axis: int, shape: Sequence[int]
) -> np.ndarray:
    """Stack per-slice 2D label maps into a case volume.

    Args:
        slices: (slice_index, label map [h, w]) pairs, in any order (from samples' `slice_index`).
        axis: the volume axis the slices were cut along (the samples' `axis`).
        shape: the volume's array shape; slices not given stay background (0).
    Returns:
        int array of `shape`.
    """
    shape = tuple(int(s) for s in shape)
    if not 0 <= axis < len(shape):
        raise ValueError(f"axis {axis} out of range for volume shape {shape}")
    plane = shape[:axis] + shape[axis + 1 :]
    volume: np.ndarray | None = None
    seen: set[int] = set()
    for index, labels in slices:
        labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if labels.shape != plane:
            raise ValueError(f"slice {index}: expected a label map of shape {plane}, got {labels.shape}")
        if not 0 <= index < shape[axis]:
            raise ValueError(f"slice index {index} out of range [0, {shape[axis]}) along axis {axis}")
        if index in seen:
            raise ValueError(f"slice {index} given twice")
        seen.add(index)
        if volume is None:
            volume = np.zeros(shape, dtype=np.result_type(labels.dtype, np.uint8))
        volume[(slice(None),) * axis + (index,)] = labels
    return volume if volume is not None else np.zeros(shape, dtype=np.uint8)
