"""Cached image embeddings: the shard format `sam-train embed` writes and the dataset that reads it.

Decoder-only training (frozen image encoder) spends almost all of its time in the encoder unless the
embeddings are computed once. One shard is one safetensors file (no pickle, loads with mmap):

| tensor | type | meaning |
|---|---|---|
| `embeddings` | fp32 / fp16 / bf16 [n, C, h, w] | `Sam.encode` of each preprocessed image |
| `rle` | uint8 [bytes] | compressed COCO RLE counts of every mask (at S x S), concatenated |
| `rle_offsets` | int64 [N + 1] | byte range of mask j: rle[rle_offsets[j]:rle_offsets[j + 1]] |
| `object_offsets` | int64 [n + 1] | masks of sample i: rows object_offsets[i]:object_offsets[i + 1] |
| `class_ids` | int64 [N] | class of each mask (-1 unknown) |
| `input_sizes`, `original_sizes` | int64 [n, 2] | (h, w) before padding, (H, W) of the original |

Header metadata (strings): `format`, `img_size` (S), `model` (json: name, checkpoint; `encoder_unit` k when
the rows are the encoder's features entering unit k, not its embeddings: `TinyViT.forward_until`), `ids` and
`meta` (json lists, parsed once per shard and process, never per sample).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader

from sam_train.data.datamodule import SamDataModule
from sam_train.data.rle import decode_compressed_rles, encode_masks
from sam_train.data.sample import META_KEYS, DataError, collate_objects, stack_per_image
from sam_train.io import atomic_save_safetensors

FORMAT = "sam_train.embeddings/1"
SHARD_GLOB = "embeddings-*.safetensors"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def storage_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"embedding storage dtype must be one of {tuple(DTYPES)}, got {name!r}")
    return DTYPES[name]


def write_embedding_shard(
    path: str | Path,
    embeddings: torch.Tensor,
    samples: Sequence[Mapping[str, Any]],
    *,
    img_size: int,
    model_info: Mapping[str, Any],
) -> Path:
    """Write one shard: embeddings [n, C, h, w] (already in the storage dtype) + the n samples' masks.

    Each sample needs `masks` bool [N, S, S], `class_ids` int64 [N], `input_size`, `original_size`,
    `id`, `source` (and optionally the medical META_KEYS). Written to a temp name, then renamed.
    """
    if embeddings.shape[0] != len(samples):
        raise ValueError(f"write_embedding_shard: {embeddings.shape[0]} embeddings for {len(samples)} samples")
    strings: list[bytes] = []
    counts = []
    for s in samples:
        if tuple(s["masks"].shape[-2:]) != (img_size, img_size):
            raise ValueError(f"{s['source']} ({s['id']}): masks must be [N, {img_size}, {img_size}] (use SamTransform)")
        strings += [rle["counts"].encode("ascii") for rle in encode_masks(s["masks"])]
        counts.append(s["masks"].shape[0])
    lengths = torch.tensor([len(b) for b in strings], dtype=torch.int64)
    tensors = {
        "embeddings": embeddings.contiguous(),
        "rle": torch.frombuffer(bytearray(b"".join(strings) or b"\0"), dtype=torch.uint8),
        "rle_offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        "object_offsets": torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(counts).cumsum(0)]),
        "class_ids": torch.cat([s["class_ids"].to(torch.int64) for s in samples]),
        "input_sizes": torch.tensor([list(s["input_size"]) for s in samples], dtype=torch.int64),
        "original_sizes": torch.tensor([list(s["original_size"]) for s in samples], dtype=torch.int64),
    }
    meta = [{k: s[k] for k in META_KEYS if k in s} for s in samples]
    metadata = {
        "format": FORMAT,
        "img_size": str(img_size),
        "model": json.dumps(dict(model_info)),
        "ids": json.dumps([str(s["id"]) for s in samples]),
        "meta": json.dumps(meta),
    }
    return atomic_save_safetensors(tensors, path, metadata=metadata)


class _Shard:
    """Everything of one shard except the embeddings, read once per process; embeddings by row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.file = safe_open(str(path), framework="pt")
            header = self.file.metadata() or {}
            if header.get("format") != FORMAT:
                found = header.get("format")
                raise DataError(f"{path}: not an embedding shard (format {found!r}, expected {FORMAT!r})")
            self.img_size = int(header["img_size"])
            self.model = json.loads(header["model"])
            self.ids = json.loads(header["ids"])
            self.meta = json.loads(header["meta"])
            t = {k: self.file.get_tensor(k) for k in
                 ("rle", "rle_offsets", "object_offsets", "class_ids", "input_sizes", "original_sizes")}
            self.embeddings = self.file.get_slice("embeddings")
        except DataError:
            raise
        except Exception as exc:  # safetensors raises several types on truncated / foreign files
            raise DataError(f"{path}: unreadable embedding shard: {type(exc).__name__}: {exc}") from exc
        self.rle = t["rle"].numpy().tobytes()
        self.rle_offsets = t["rle_offsets"].tolist()
        self.object_offsets = t["object_offsets"].tolist()
        self.class_ids, self.input_sizes, self.original_sizes = t["class_ids"], t["input_sizes"], t["original_sizes"]
        self.shape = tuple(self.embeddings.get_shape())
        if not (len(self.ids) == len(self.meta) == self.shape[0] == len(self.object_offsets) - 1):
            raise DataError(f"{path}: inconsistent shard ({self.shape[0]} embeddings, {len(self.ids)} ids)")

    def __len__(self) -> int:
        return self.shape[0]

    def masks(self, row: int) -> torch.Tensor:
        """bool [N, S, S] masks of sample `row`, decoded in one vectorised pass."""
        lo, hi = self.object_offsets[row], self.object_offsets[row + 1]
        s = self.img_size
        if hi == lo:
            return torch.zeros(0, s, s, dtype=torch.bool)
        strings = [self.rle[self.rle_offsets[j]:self.rle_offsets[j + 1]] for j in range(lo, hi)]
        masks = decode_compressed_rles([{"size": [s, s], "counts": b} for b in strings], s, s)
        if masks is None:
            raise DataError(f"{self.path}: malformed RLE in sample {self.ids[row]!r}")
        return torch.from_numpy(masks)

    def sample(self, row: int) -> dict[str, Any]:
        lo, hi = self.object_offsets[row], self.object_offsets[row + 1]
        unit = self.model.get("encoder_unit")
        return {
            **({} if unit is None else {"encoder_unit": int(unit)}),
            "embedding": self.embeddings[row : row + 1][0],
            "masks": self.masks(row),
            "class_ids": self.class_ids[lo:hi],
            "input_size": tuple(self.input_sizes[row].tolist()),
            "original_size": tuple(self.original_sizes[row].tolist()),
            "id": self.ids[row],
            "source": str(self.path),
            **self.meta[row],
        }


def _num_rows(path: Path) -> int:
    """Number of samples of a shard from its header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return int(f.get_slice("embeddings").get_shape()[0])
    except Exception as exc:
        raise DataError(f"{path}: unreadable embedding shard: {type(exc).__name__}: {exc}") from exc


class EmbeddingDataset(torch.utils.data.Dataset):
    """Map-style dataset over the shards `sam-train embed` wrote into `root`.

    Each sample: `embedding` float [C, h, w], `masks` bool [N, S, S], `class_ids` int64 [N],
    `input_size`, `original_size`, `id`, `source` (the shard) and any medical meta keys.

    Args:
        root: folder with `embeddings-*.safetensors` shards.
        img_size: expected model input side S (the model being trained); mismatching shards raise.
        dtype: embeddings are cast to this ("fp32" default; None keeps the storage dtype).
        max_objects: at most this many masks per sample, a fresh random subset per access (SAM: 64).
        seed: seed of that subsampling (each DataLoader worker derives its own stream).
    """

    def __init__(
        self,
        *,
        root: str | Path,
        img_size: int | None = None,
        dtype: str | None = "fp32",
        max_objects: int | None = None,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.paths = sorted(self.root.glob(SHARD_GLOB))
        if not self.paths:
            raise DataError(f"{self.root}: no embedding shards ({SHARD_GLOB}); run `sam-train embed` first")
        self.dtype = None if dtype is None else storage_dtype(dtype)
        self.max_objects = max_objects
        self.seed = seed
        self._shards: dict[int, _Shard] = {}
        self._generator: torch.Generator | None = None
        self._next_seed: int | None = None  # set by seed_next for the next access only
        first = self.shard(0)
        if img_size is not None and first.img_size != img_size:
            raise DataError(f"{first.path}: embeddings were computed at img_size={first.img_size}, "
                            f"but the model expects img_size={img_size}")
        self.info = {"img_size": first.img_size, "model": first.model}
        sizes = [len(first)] + [_num_rows(p) for p in self.paths[1:]]
        self.starts = np.cumsum([0] + sizes).tolist()
        self._shards = {}  # reopened lazily in each worker process

    def __getstate__(self) -> dict[str, Any]:  # safetensors handles do not pickle (spawned workers)
        return {**self.__dict__, "_shards": {}, "_generator": None}

    def shard(self, k: int) -> _Shard:
        if k not in self._shards:
            self._shards[k] = _Shard(self.paths[k])
        return self._shards[k]

    def __len__(self) -> int:
        return self.starts[-1]

    def seed_next(self, seed: int) -> None:
        """Seed the next access's object subsampling (SamDataModule does, from (seed, epoch, index)), so a
        resumed run draws the same subsets as an uninterrupted one."""
        self._next_seed = seed

    def _subsample(self, sample: dict[str, Any]) -> dict[str, Any]:
        n = sample["masks"].shape[0]
        next_seed, self._next_seed = self._next_seed, None
        if self.max_objects is None or n <= self.max_objects:
            return sample
        if next_seed is not None:
            generator = torch.Generator().manual_seed(next_seed)
        else:
            if self._generator is None:
                info = torch.utils.data.get_worker_info()
                self._generator = torch.Generator().manual_seed(self.seed if info is None else info.seed % 2**63)
            generator = self._generator
        keep = torch.randperm(n, generator=generator)[: self.max_objects].sort().values
        return {**sample, "masks": sample["masks"][keep], "class_ids": sample["class_ids"][keep]}

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"EmbeddingDataset index {index} out of range [0, {len(self)})")
        k = bisect.bisect_right(self.starts, index) - 1
        sample = self.shard(k).sample(index - self.starts[k])
        if self.dtype is not None:
            sample["embedding"] = sample["embedding"].to(self.dtype)
        return self._subsample(sample)


def collate_embeddings(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """EmbeddingDataset samples -> decoder-only batch: the `collate_sam` format with `embeddings`
    float [B, C, h, w] in place of `images` (docs/architecture.md); shards of intermediate features give
    `features` [B, C_k, h_k, w_k] and `encoder_unit` k instead (`Sam.batch_embeddings` runs the rest)."""
    embeddings = stack_per_image(samples, "embedding", "collate_embeddings")
    units = {s.get("encoder_unit") for s in samples}
    if len(units) > 1:
        raise DataError(f"collate_embeddings: samples from shards of different encoder units {sorted(map(str, units))}")
    unit = units.pop()
    if unit is None:
        return {"embeddings": embeddings, **collate_objects(samples)}
    return {"features": embeddings, "encoder_unit": unit, **collate_objects(samples)}


class EmbeddingDataModule(SamDataModule):
    """SamDataModule whose loaders collate decoder-only batches (`collate_embeddings`).

    Args:
        root: the embed command's out_dir (the config derives the datasets' roots from it).
        **kwargs: SamDataModule arguments (train / val EmbeddingDatasets, batch_size, ...).
    """

    def __init__(self, *, root: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = root

    def _loader(self, dataset: Any, *, batch_size: int, train: bool) -> DataLoader:
        loader = super()._loader(dataset, batch_size=batch_size, train=train)
        loader.collate_fn = collate_embeddings  # DataLoader reads it when an iterator is created
        return loader
