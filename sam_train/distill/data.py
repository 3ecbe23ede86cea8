"""Images for distillation: unlabelled folders, the teacher's cached embeddings joined by sample id, and
the data module that caches them once (on global rank 0) or leaves the teacher to run on the fly.

Any sample dataset works as the image source (medical slices, SA-1B-style shards, COCO, folders with
masks): stage 1 reads only `image` and `id`. Cached targets are the shards `sam-train embed` writes
(`sam_train.data.embeddings`), so a cache made once by `sam-train embed` is read as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from sam_train.data.datamodule import SamDataModule
from sam_train.data.embeddings import SHARD_GLOB, EmbeddingDataset
from sam_train.data.image_io import image_files, read_image
from sam_train.data.sample import DataError, SampleDataset, collate_sam, make_sample
from sam_train.errors import SamTrainError

log = logging.getLogger(__name__)
COMPLETE = ".complete"  # written into a cache folder once all of its shards are there


class UnlabelledImageFolder(SampleDataset):
    """Every image file under `root` (recursively, sorted) as a sample without masks (N = 0).

    Args:
        root: folder of images in any layout; the id of a sample is its path relative to `root`.
        transform: usually a `SamTransform` (resize + pad to the model input).
        on_error, max_skip_fraction: as for every SampleDataset.
    """

    def __init__(self, *, root: str | Path, transform=None, on_error: str = "raise", max_skip_fraction: float = 0.1):
        super().__init__(transform=transform, on_error=on_error, max_skip_fraction=max_skip_fraction)
        self.root = Path(root)
        self.files = image_files(self.root)

    def __len__(self) -> int:
        return len(self.files)

    def source_of(self, index: int) -> str:
        return str(self.files[index])

    def load(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        image = read_image(path)
        empty = torch.zeros(0, *image.shape[1:], dtype=torch.bool)
        return make_sample(image, empty, id=str(path.relative_to(self.root)), source=str(path))


def is_deterministic(transform: Any) -> bool:
    """True unless the transform draws random augmentations (SamTransform flips / scale jitter)."""
    return not (
        getattr(transform, "hflip_p", 0.0) or getattr(transform, "vflip_p", 0.0)
        or tuple(getattr(transform, "scale_jitter", (1.0, 1.0))) != (1.0, 1.0)
    )


class TeacherEmbeddingIndex:
    """The teacher's cached embeddings by sample id, read from `sam-train embed` shards in `root`."""

    def __init__(self, root: str | Path, *, img_size: int | None = None) -> None:
        self.root = Path(root)
        self.dataset = EmbeddingDataset(root=self.root, img_size=img_size, dtype="fp32")
        self.rows: dict[str, tuple[int, int]] = {}
        for k in range(len(self.dataset.paths)):
            for row, sample_id in enumerate(self.dataset.shard(k).ids):
                self.rows[str(sample_id)] = (k, row)
        self.dataset._shards = {}  # reopened lazily in each worker process

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, sample_id: str) -> torch.Tensor:
        """fp32 [C, h, w] embedding of `sample_id`; DataError naming the folder if it was not cached."""
        if sample_id not in self.rows:
            raise DataError(
                f"{self.root}: no cached teacher embedding for sample {sample_id!r} (the cache holds {len(self.rows)} "
                f"other ids); recompute them (distill_data.cache=true with a fresh distill_data.teacher_embeddings)"
            )
        k, row = self.rows[sample_id]
        return self.dataset.shard(k).embeddings[row : row + 1][0].float()


class WithTeacherEmbeddings(Dataset):
    """A map-style sample dataset whose samples also carry `teacher_embedding` (fp32 [C, h, w])."""

    def __init__(self, dataset: Any, index: TeacherEmbeddingIndex) -> None:
        self.dataset, self.index = dataset, index

    @property
    def transform(self) -> Any:  # EpochSeededDataset seeds it per sample
        return getattr(self.dataset, "transform", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.dataset[i]
        return {**sample, "teacher_embedding": self.index.get(str(sample["id"]))}


class IterableWithTeacherEmbeddings(IterableDataset):
    """The same for iterable datasets (webdataset shards)."""

    def __init__(self, dataset: Any, index: TeacherEmbeddingIndex) -> None:
        super().__init__()
        self.dataset, self.index = dataset, index

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for sample in self.dataset:
            yield {**sample, "teacher_embedding": self.index.get(str(sample["id"]))}


def collate_distill(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """`collate_sam` plus `teacher_embeddings` float [B, C, h, w] when the samples carry cached ones."""
    batch = collate_sam(samples)
    if all("teacher_embedding" in s for s in samples):
        batch["teacher_embeddings"] = torch.stack([s["teacher_embedding"] for s in samples])
    return batch


class DistillDataModule(SamDataModule):
    """Images for embedding distillation (`collate_distill` batches), optionally with cached teacher targets.

    Args:
        teacher_embeddings: folder of the teacher's embedding shards (`sam-train embed` layout), or None to
            run the teacher on every batch. A folder is read as it is when it holds shards; with `cache`
            it is written first (once, on global rank 0) when it has none.
        cache: encode the training images with the teacher into `teacher_embeddings` before training
            (ignored without a folder: the teacher then runs on the fly).
        cache_dtype: storage of the cached embeddings: fp32 (exact), fp16 / bf16 (half the size).
        cache_batch_size: images the teacher encodes at once while caching.
        **kwargs: SamDataModule arguments (train, val, batch_size, num_workers, seed, ...).
    The teacher used for caching is attached in code (`datamodule.teacher = ...`), not configured.
    """

    def __init__(
        self,
        *,
        teacher_embeddings: str | Path | None = None,
        cache: bool = False,
        cache_dtype: str = "fp32",
        cache_batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.teacher_embeddings = None if teacher_embeddings is None else Path(teacher_embeddings)
        self.cache, self.cache_dtype, self.cache_batch_size = cache, cache_dtype, cache_batch_size
        self.teacher: Any = None
        self.prepare_data_per_node = False  # one writer for the whole job (a shared file system)
        self._joined = False

    @property
    def cached(self) -> bool:
        return self.teacher_embeddings is not None

    def _check_deterministic(self) -> None:
        transform = getattr(self.train, "transform", None)
        if not is_deterministic(transform):
            raise SamTrainError(
                "cached teacher embeddings need a deterministic stage-1 transform: set "
                "distill_data.train.transform.hflip_p=0 (and vflip_p=0, scale_jitter=[1,1]), or run the teacher "
                "on the fly (distill_data.teacher_embeddings=null)"
            )

    def cache_complete(self) -> bool:
        d = self.teacher_embeddings
        return d is not None and d.is_dir() and any(d.glob(SHARD_GLOB)) and (not self.cache or (d / COMPLETE).is_file())

    def prepare_data(self) -> None:
        """Global rank 0 only (Lightning): encode the training images once if the cache is asked for."""
        if not self.cached:
            return
        self._check_deterministic()
        if self.cache_complete():
            return
        if not self.cache:
            raise SamTrainError(f"distill_data.teacher_embeddings={self.teacher_embeddings}: no embedding shards "
                                f"there; set distill_data.cache=true to compute them")
        if self.teacher is None:
            raise SamTrainError("distill_data.cache=true but no teacher was attached to the data module")
        from sam_train.embed import embed_dataset

        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        teacher = self.teacher.to(device)
        log.info("caching the teacher's embeddings of the stage-1 images in %s", self.teacher_embeddings)
        embed_dataset(
            teacher, self.train, self.teacher_embeddings, batch_size=self.cache_batch_size, dtype=self.cache_dtype,
            model_info={"role": "distillation teacher"}, progress=False,
        )
        (self.teacher_embeddings / COMPLETE).write_text("teacher embeddings of the stage-1 images\n")

    def setup(self, stage: str | None = None) -> None:
        if not self.cached or self._joined:
            return
        self._check_deterministic()
        if not self.cache_complete():
            raise SamTrainError(f"distill_data.teacher_embeddings={self.teacher_embeddings}: no (complete) embedding "
                                f"shards; set distill_data.cache=true to compute them")
        img_size = getattr(getattr(self.train, "transform", None), "img_size", None)
        index = TeacherEmbeddingIndex(self.teacher_embeddings, img_size=img_size)
        wrap = IterableWithTeacherEmbeddings if isinstance(self.train, IterableDataset) else WithTeacherEmbeddings
        self.train = wrap(self.train, index)
        self._joined = True

    def _loader(self, dataset: Any, *, batch_size: int, train: bool) -> DataLoader:
        loader = super()._loader(dataset, batch_size=batch_size, train=train)
        loader.collate_fn = collate_distill  # DataLoader reads it when an iterator is created
        return loader
