"""COCO segmentations (polygons, uncompressed and compressed RLE) <-> bool masks via pycocotools.

pycocotools' C decoder does not bound-check run lengths (a malformed RLE writes past the mask
buffer), so every RLE is validated here first and a bad one becomes a DataError naming its file.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch

from sam_train.data.sample import DataError


def _decode_counts(strings: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run lengths of several compressed COCO RLE strings at once.

    Returns (runs int64 [R], owner int64 [R] = the string of each run, pos int64 [R] = its index inside
    that string; even runs are background, as every COCO RLE starts with a background run).
    The inverse of pycocotools' rleToString, vectorised: each run is a little-endian base-32 number
    (5 bits per character, bit 0x20 = more characters follow, bit 0x10 of the last one = sign); from
    the third run of a string on, a run is stored as the difference to the run two before it.
    Raises ValueError on an invalid string.
    """
    lengths = np.array([len(b) for b in strings], np.int64)
    if (lengths == 0).any():
        raise ValueError("empty compressed counts string")
    s = np.frombuffer(b"".join(strings), np.uint8).astype(np.int64) - 48
    if s.min() < 0 or s.max() >= 64:
        bad = s[(s < 0) | (s >= 64)][0] + 48
        raise ValueError(f"invalid character {chr(int(bad))!r} in compressed counts")
    more = (s & 0x20) != 0
    string_ends = np.cumsum(lengths) - 1
    if more[string_ends].any():
        raise ValueError("compressed counts string ends inside a number")
    ends = np.flatnonzero(~more)
    starts = np.r_[0, ends[:-1] + 1]
    group = np.repeat(np.arange(ends.size), ends - starts + 1)
    k = np.arange(s.size) - starts[group]  # position of each character inside its number
    if k.max() > 12:
        raise ValueError("a run length has more than 12 characters")
    x = np.bincount(group, weights=(s & 0x1F) << (5 * k), minlength=ends.size).astype(np.int64)
    negative = (s[ends] & 0x10) != 0
    x[negative] -= np.int64(1) << (5 * (k[ends][negative] + 1))
    owner = np.searchsorted(string_ends, ends)  # string of each run
    pos = np.arange(ends.size) - np.searchsorted(owner, np.arange(len(strings)))[owner]
    # undo the delta coding: a cumulative sum per (string, parity) over runs 1, 2, ... (run 0 stands
    # alone); runs are ordered by string then position, so each parity's selection is already grouped
    runs = x.copy()
    for parity in (0, 1):
        sel = np.flatnonzero((pos >= 1) & (pos % 2 == parity))
        if sel.size == 0:
            continue
        total = np.cumsum(x[sel])
        first = np.r_[True, owner[sel][1:] != owner[sel][:-1]]
        before = (total - x[sel])[first]  # cumulative sum before each string's segment
        runs[sel] = total - np.repeat(before, np.diff(np.r_[np.flatnonzero(first), sel.size]))
    return runs, owner, pos


def compressed_rle_counts(counts: str | bytes, where: str) -> np.ndarray:
    """Run lengths (int64 [R]) of one compressed COCO RLE string; DataError naming `where` if invalid."""
    try:
        return _decode_counts([counts.encode() if isinstance(counts, str) else counts])[0]
    except ValueError as exc:
        raise DataError(f"{where}: malformed RLE: {exc}") from exc


def decode_compressed_rles(segmentations: list[Any], height: int, width: int) -> np.ndarray | None:
    """Fast path for many compressed RLEs of one image -> bool [N, height, width], or None when any of
    them is not a well-formed compressed RLE of this size (then check each with check_rle, which names
    the bad one).

    Validates and decodes all masks at once: the run lengths of every string in one vectorised pass,
    then one np.repeat over all runs (~3x faster than a pycocotools decode per mask).
    """
    try:
        strings = [s["counts"].encode() if isinstance(s["counts"], str) else s["counts"] for s in segmentations]
        if not all(isinstance(b, bytes) and list(seg["size"]) == [height, width]
                   for b, seg in zip(strings, segmentations, strict=True)):
            return None
        runs, owner, pos = _decode_counts(strings)
    except (ValueError, TypeError, KeyError):
        return None
    sums = np.bincount(owner, weights=runs, minlength=len(strings))
    if (runs < 0).any() or (sums != height * width).any():
        return None
    flat = np.repeat((pos % 2).astype(np.uint8), runs)  # column-major masks, one after the other
    columns = flat.view(bool).reshape(len(strings), width, height)
    # [N, H, W] view with column-major planes, as pycocotools' decode gives them (a C-order copy would
    # be a slow byte transpose; torch and numpy read the strides, and resizing copies anyway)
    return columns.transpose(0, 2, 1)


def check_rle(rle: Any, height: int, width: int, where: str) -> dict[str, Any]:
    """Validate an RLE dict {"size": [h, w], "counts": list[int] | str} -> pycocotools RLE object."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise DataError(f"{where}: malformed RLE: expected a dict with 'size' and 'counts', got {rle!r:.80}")
    size = list(rle["size"]) if isinstance(rle["size"], list | tuple) else rle["size"]
    if size != [height, width]:
        raise DataError(f"{where}: malformed RLE: size {size} != image size [{height}, {width}]")
    counts = rle["counts"]
    if isinstance(counts, list):
        if not all(isinstance(r, int | np.integer) for r in counts):
            raise DataError(f"{where}: malformed RLE: uncompressed counts must be integers")
        runs = np.asarray(counts, np.int64)
    elif isinstance(counts, str | bytes):
        runs = compressed_rle_counts(counts, where)
    else:
        kind = type(counts).__name__
        raise DataError(f"{where}: malformed RLE: counts must be a list of ints or a string, got {kind}")
    if (runs < 0).any() or runs.sum() != height * width:
        raise DataError(
            f"{where}: malformed RLE: run lengths sum to {runs.sum()} (negative runs: {bool((runs < 0).any())}),"
            f" expected {height * width} = {height} x {width}"
        )
    if isinstance(counts, list):  # uncompressed -> compressed, as pycocotools intends
        return mask_utils.frPyObjects(rle, height, width)
    return {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}


def decode_segmentation(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
    """COCO segmentation (polygon list, uncompressed or compressed RLE) -> bool [height, width]."""
    if isinstance(segmentation, list):
        if not segmentation or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segmentation):
            raise DataError(f"{where}: malformed polygon: expected lists of >= 3 (x, y) pairs")
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    else:
        rle = check_rle(segmentation, height, width, where)
    return mask_utils.decode(rle).view(bool)  # 0/1 bytes


def encode_masks(masks: np.ndarray | torch.Tensor) -> list[dict[str, Any]]:
    """bool [N, H, W] (numpy or torch, any device) -> N compressed COCO RLEs {"size": [H, W], "counts": str}
    (json-serialisable, SA-1B style), in one pycocotools call; [] for N = 0."""
    arr = masks.cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if arr.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {arr.shape}")
    if arr.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(arr.transpose(1, 2, 0).astype(np.uint8)))  # [H, W, N], Fortran order
    return [{"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in rles]


def encode_mask(mask: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """bool [H, W] -> compressed RLE {"size": [H, W], "counts": str} (see `encode_masks`)."""
    return encode_masks(mask[None])[0]


def rle_bytes(rle: dict[str, Any]) -> dict[str, Any]:
    """A compressed RLE as pycocotools' functions want it: counts as bytes (ours are str, for JSON)."""
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """A well-formed compressed RLE (str or bytes counts, e.g. from `encode_masks`) -> bool [H, W].
    Unchecked: RLEs read from files go through `decode_segmentation`, which validates them first."""
    return mask_utils.decode(rle_bytes(rle)).astype(bool)


def rle_bbox_area(rle: dict[str, Any]) -> tuple[list[float], int]:
    """Compressed RLE -> (COCO bbox [x, y, w, h], area in pixels)."""
    rle = rle_bytes(rle)
    return [float(v) for v in mask_utils.toBbox(rle)], int(mask_utils.area(rle))
