"""Decoder training on embeddings cached inside `fit`: encode the training images once, then train the
prompt encoder + mask decoder for as many steps as the budget allows without running the encoder again.
With the encoder's last units trainable (finetune=encoder_tail) the cache holds the features entering the
first trainable unit, and each step runs only the encoder's tail on them.

`sam-train embed` + `data=embeddings` do the same in two commands; `CachedEmbeddingDataModule` does it in
one, inside the fit (and inside its wall-clock budget, `sam_train.wall_clock.WallClockBudget`), on the
image data set of any data config. Augmentation survives the caching as *views*: each training image is
encoded once per view (as is, flipped), and the views are separate training samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from sam_train.data.datamodule import SamDataModule
from sam_train.data.embeddings import SHARD_GLOB, EmbeddingDataset, collate_embeddings
from sam_train.data.sample import DataError
from sam_train.errors import SamTrainError
from sam_train.finetune.freeze import trainable_parameter_names

log = logging.getLogger(__name__)
VIEWS = ("none", "hflip", "vflip")


def weights_fingerprint(module: torch.nn.Module, keep: Callable[[str], bool] | None = None) -> str:
    """Short hash of a module's parameters and buffers (those whose name `keep` accepts): a cache encoded
    with other weights is not reused."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in module.state_dict().items():
        if keep is not None and not keep(name):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class AugmentedViews(Dataset):
    """Every sample of a SampleDataset under each of `views` (flips applied before its transform).

    Index `v * n + i` is sample i under view v. The dataset's own transform must be deterministic
    (no random flips): the views are the augmentation.
    """

    def __init__(self, dataset: Any, views: Sequence[str] = ("none",)) -> None:
        unknown = [v for v in views if v not in VIEWS]
        if unknown or not views:
            raise ValueError(f"views must be a non-empty list of {VIEWS}, got {list(views)}")
        if not hasattr(dataset, "try_load"):
            raise DataError(f"{type(dataset).__name__}: cached views need a map-style SampleDataset")
        self.dataset, self.views = dataset, tuple(views)

    def __len__(self) -> int:
        return len(self.dataset) * len(self.views)

    def __getitem__(self, index: int) -> dict[str, Any]:
        v, i = divmod(index, len(self.dataset))
        sample = self.dataset[i] if self.views[v] == "none" else None
        if sample is not None:
            return sample
        raw = self.dataset.try_load(i)
        if raw is None:  # a bad sample with on_error=skip: the dataset serves the next good one
            return self.dataset[i]
        dim = -1 if self.views[v] == "hflip" else -2
        raw = {**raw, "image": raw["image"].flip(dim), "masks": raw["masks"].flip(dim),
               "id": f"{raw['id']}#{self.views[v]}"}
        return self.dataset.transform(raw) if self.dataset.transform is not None else raw


class CachedEmbeddingDataModule(SamDataModule):
    """SamDataModule that replaces its training images by cached image embeddings in `setup("fit")`.

    The model's image encoder must be frozen (finetune=decoder_only) or train only a tail of its units
    (finetune=encoder_tail: the cache then holds the features entering the first trainable unit).
    Validation and evaluation read the images (`val`) as usual.

    Args:
        train, val: image data sets (SampleDatasets with a deterministic SamTransform).
        views: augmentations each training image is encoded under ("none", "hflip", "vflip").
        cache_dir: where the shards go (default `<run dir>/embeddings/train`); a complete cache of the
            same images, views, encoder weights, dtype and precision there is reused (a resumed run does not
            encode again); any other cache there is encoded anew.
        cache_dtype: storage of the embeddings (fp16 | bf16 | fp32).
        precision: encoder compute (fp32 | bf16 autocast).
        encode_batch_size: images encoded at once.
        max_cache_fraction: with a wall-clock budget, encoding stops once this fraction of it is used and
            training uses the images encoded so far (a random subset: they are encoded in random order).
        max_objects: masks per cached sample and access (random subset).
        **kwargs: SamDataModule arguments (batch_size, num_workers, seed, ...).
    """

    def __init__(
        self,
        *,
        train: Any,
        val: Any | None = None,
        views: Sequence[str] = ("none",),
        cache_dir: str | Path | None = None,
        cache_dtype: str = "fp16",
        precision: str = "fp32",
        encode_batch_size: int = 4,
        max_cache_fraction: float = 0.5,
        max_objects: int | None = 64,
        **kwargs: Any,
    ) -> None:
        self.images = train
        self.views = tuple(views)
        # before setup the training set is the views of the images (its length is the cached one's)
        views_of = AugmentedViews(train, self.views) if train is not None else None
        super().__init__(train=views_of, val=val, **kwargs)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.cache_dtype, self.precision = cache_dtype, precision
        self.encode_batch_size = encode_batch_size
        if not 0.0 < max_cache_fraction <= 1.0:
            raise ValueError(f"max_cache_fraction must be in (0, 1], got {max_cache_fraction}")
        self.max_cache_fraction = max_cache_fraction
        self.max_objects = max_objects
        self.cache_seconds: float | None = None  # how long this process spent encoding

    def _cache_root(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir
        root = Path(self.trainer.default_root_dir) if self.trainer is not None else Path(".")
        return root / "embeddings" / "train"

    def setup(self, stage: str | None = None) -> None:
        if stage not in (None, "fit") or self.images is None or isinstance(self.train, EmbeddingDataset):
            return
        if self.trainer is None:
            raise SamTrainError("CachedEmbeddingDataModule encodes with the model being trained: use it in fit")
        model = self.trainer.lightning_module.model
        unit = self.first_trainable_unit(model.image_encoder)
        frozen = None if unit is None else (lambda name: model.image_encoder.unit_of(name) < unit)
        out = self._cache_root()
        key = {"images": len(self.images), "views": list(self.views), "img_size": model.img_size,
               "model": type(model.image_encoder).__name__, "encoder_unit": unit,
               "weights": weights_fingerprint(model.image_encoder, frozen),
               "dtype": self.cache_dtype, "precision": self.precision}
        strategy = self.trainer.strategy
        if strategy.is_global_zero and not self._complete(out, key):
            self._encode(model, out, key)
        strategy.barrier("cached_embeddings")
        self.train = EmbeddingDataset(root=out, img_size=model.img_size, dtype="fp32",
                                      max_objects=self.max_objects, seed=self.seed)

    @staticmethod
    def first_trainable_unit(encoder: torch.nn.Module) -> int | None:
        """None for a frozen encoder (cache its embeddings), else the first unit with a trainable parameter
        (cache the features entering it); raises when the encoder cannot be split there."""
        trainable = trainable_parameter_names(encoder)
        if not trainable:
            return None
        unit = min(encoder.unit_of(name) for name in trainable) if hasattr(encoder, "unit_of") else 0
        if unit == 0:
            first = min(trainable, key=encoder.unit_of) if hasattr(encoder, "unit_of") else trainable[0]
            raise SamTrainError(
                f"cached embeddings need a frozen image encoder (finetune=decoder_only) or a frozen front of it "
                f"(finetune=encoder_tail), but {type(encoder).__name__} trains from its first unit on (e.g. {first})"
            )
        return unit

    @staticmethod
    def _complete(out: Path, key: dict[str, Any]) -> bool:
        marker = out / "cache.json"
        if not marker.is_file() or not any(out.glob(SHARD_GLOB)):
            return False
        try:
            return json.loads(marker.read_text()).get("key") == key
        except json.JSONDecodeError:
            return False

    def _encode(self, model: Any, out: Path, key: dict[str, Any]) -> None:
        from sam_train.embed import embed_dataset
        from sam_train.wall_clock import budget_of

        views = AugmentedViews(self.images, self.views)
        order = torch.randperm(len(views), generator=torch.Generator().manual_seed(self.seed)).tolist()
        budget = budget_of(self.trainer)
        deadline = None if budget is None else budget.start + self.max_cache_fraction * budget.budget
        was_training, device = model.training, model.device
        model.to(self.trainer.strategy.root_device)
        t0 = time.time()
        try:
            paths = embed_dataset(
                model, Subset(views, order), out, batch_size=self.encode_batch_size, shard_size=1000,
                dtype=self.cache_dtype, precision=self.precision, progress=False, deadline=deadline,
                model_info={"name": key["model"], "views": list(self.views)}, until_unit=key["encoder_unit"],
            )
        finally:
            model.train(was_training)
            model.to(device)
        self.cache_seconds = time.time() - t0
        n = sum(EmbeddingDataset(root=out).starts[-1:]) if paths else 0
        (out / "cache.json").write_text(json.dumps({"key": key, "encoded": n, "seconds": self.cache_seconds}))
        log.info("cached %d of %d training views (%d images x %d views) in %.0f s -> %s",
                 n, len(views), len(self.images), len(self.views), self.cache_seconds, out)

    def _loader(self, dataset: Any, *, batch_size: int, train: bool) -> DataLoader:
        loader = super()._loader(dataset, batch_size=batch_size, train=train)
        if isinstance(dataset, EmbeddingDataset):
            loader.collate_fn = collate_embeddings  # DataLoader reads it when an iterator is created
        return loader
