"""Images-only data for self-supervised (MAE) pretraining: image folders or webdataset shards.

Every item is one augmented, normalised float image [3, S, S]; the default collate stacks them to
[B, 3, S, S]. The augmentation is MAE's: RandomResizedCrop(S, scale 0.2-1, bicubic) + horizontal
flip, then ImageNet mean/std normalisation (the same statistics SAM's `preprocess` uses, so the
pretrained encoder sees the input distribution it will get inside SAM).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision.transforms import InterpolationMode, v2

from sam_train.data.datamodule import EpochSeededDataset, ResumableSampler
from sam_train.data.image_io import decode_image_bytes, image_files, read_image
from sam_train.data.sample import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Extensions of the image member of a webdataset sample, in order of preference.
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp")

ImageTransform = Callable[[torch.Tensor], torch.Tensor]


def mae_train_transform(
    img_size: int = 224,
    *,
    scale: tuple[float, float] = (0.2, 1.0),
    hflip: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """uint8 [3, H, W] -> float32 [3, img_size, img_size]: random resized crop, flip, normalise.

    Randomness comes from torch's global RNG; `SeededTransform` makes it a function of the sample's
    position in training (ImageOnlyDataModule does, for image folders).
    """
    return v2.Compose(
        [
            v2.RandomResizedCrop(img_size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(p=hflip),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


class SeededTransform:
    """A transform that draws from torch's global RNG (torchvision's), run on a generator state seeded by
    `seed_next` (EpochSeededDataset calls it from (seed, epoch, index)): the same crop for the same
    sample of the same epoch, after a resume too. The caller's global RNG is left untouched."""

    def __init__(self, transform: ImageTransform) -> None:
        self.transform = transform
        self._next_seed: int | None = None

    def seed_next(self, seed: int) -> None:
        self._next_seed = seed

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        seed, self._next_seed = self._next_seed, None
        if seed is None:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image)


class ImageFolderDataset(Dataset):
    """Every image file under `root` (recursively, sorted), labels ignored.

    Args:
        root: folder of images, in any sub-folder layout (ImageNet's class folders work as they are).
        transform: applied to the uint8 [3, H, W] image (e.g. `mae_train_transform()`).
    """

    def __init__(self, root: str | Path, *, transform: ImageTransform | None = None) -> None:
        self.root = Path(root)
        self.files = image_files(self.root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = read_image(self.files[index])  # DataError names the file
        return self.transform(image) if self.transform is not None else image


def _decode_wds_image(sample: dict[str, Any]) -> torch.Tensor:
    """Raw webdataset sample -> uint8 [3, H, W] from its first image member."""
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    for key in WDS_IMAGE_KEYS:
        if key in sample:
            return decode_image_bytes(sample[key], where)
    members = sorted(k for k in sample if not k.startswith("__"))
    raise DataError(f"{where}: no image member (expected one of {', '.join(WDS_IMAGE_KEYS)}; found {members})")


def image_webdataset(
    urls: str | Sequence[str],
    *,
    transform: ImageTransform | None = None,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
    epoch_length: int | None = None,
    seed: int | None = None,
) -> wds.WebDataset:
    """Iterable dataset of images from webdataset tar shards (`{000..099}` brace patterns work).

    Args:
        urls: shard path(s) or URL(s).
        transform: applied to the uint8 [3, H, W] image.
        shuffle_buffer: in-memory sample shuffle buffer (0 = no shuffle).
        resampled: draw shards with replacement forever: every rank and worker always has data, the
            safe choice for multi-GPU training (set `epoch_length` to define epochs).
        epoch_length: samples per epoch of each DataLoader worker (`with_epoch`); needed with `resampled`.
        seed: shard-shuffle seed (default: webdataset's own).
    Shards are split across ranks (`split_by_node`) and DataLoader workers.
    """
    if resampled and epoch_length is None:
        raise ValueError("image_webdataset: resampled=True is endless; set epoch_length (samples per worker)")
    ds = wds.WebDataset(
        urls,
        resampled=resampled,
        shardshuffle=False if resampled else 100,
        nodesplitter=wds.split_by_node,
        empty_check=False,
        seed=seed,
    )
    if shuffle_buffer > 0:
        ds = ds.shuffle(shuffle_buffer)
    ds = ds.map(_decode_wds_image)
    if transform is not None:
        ds = ds.map(transform)
    return ds.with_epoch(epoch_length) if epoch_length is not None else ds


class ImageOnlyDataModule(pl.LightningDataModule):
    """Training images for MAE pretraining from a folder (`root`) or webdataset shards (`shards`).

    Args:
        root / shards: exactly one source.
        img_size: crop side of `mae_train_transform`.
        batch_size: per-device batch (the MAE module scales the lr by world size x this x accumulation).
        num_workers: DataLoader workers.
        resampled, epoch_length, shuffle_buffer: webdataset options (see `image_webdataset`).
        seed: image folders: seed of the order and of each image's crop, both restored exactly on resume.
    """

    def __init__(
        self,
        *,
        root: str | None = None,
        shards: str | list[str] | None = None,
        img_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 8,
        resampled: bool = True,
        epoch_length: int | None = 10000,
        shuffle_buffer: int = 1000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if (root is None) == (shards is None):
            raise ValueError("ImageOnlyDataModule: give exactly one of data.root (image folder) or data.shards")
        self.root, self.shards = root, shards
        self.img_size, self.batch_size, self.num_workers = img_size, batch_size, num_workers
        self.resampled, self.epoch_length, self.shuffle_buffer = resampled, epoch_length, shuffle_buffer
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        transform = mae_train_transform(self.img_size)
        common: dict[str, Any] = dict(batch_size=self.batch_size, num_workers=self.num_workers, drop_last=True)
        common["pin_memory"] = torch.cuda.is_available()
        common["persistent_workers"] = self.num_workers > 0
        if self.root is not None:
            # as SamDataModule: order, crops and the loader position are restored exactly on resume
            folder = ImageFolderDataset(self.root, transform=SeededTransform(transform))
            dataset = EpochSeededDataset(folder, seed=self.seed)
            sampler = ResumableSampler(dataset, shuffle=True, seed=self.seed, batch_size=self.batch_size)
            return StatefulDataLoader(dataset, sampler=sampler, **common)
        ds = image_webdataset(
            self.shards,  # type: ignore[arg-type]
            transform=transform,
            shuffle_buffer=self.shuffle_buffer,
            resampled=self.resampled,
            epoch_length=self.epoch_length if self.resampled else None,
        )
        return DataLoader(ds, **common)
