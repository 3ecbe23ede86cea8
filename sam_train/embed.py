"""`sam-train embed`: encode each image of a data set once and store embeddings + masks as shards.

Decoder-only training then reads the shards (`data=embeddings`, sam_train/data/embeddings.py) and never
runs the image encoder: for vit_h that is > 95% of a training step's FLOPs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from sam_train.data.embeddings import SHARD_GLOB, storage_dtype, write_embedding_shard
from sam_train.errors import SamTrainError
from sam_train.models.sam import Sam

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
PRECISIONS = ("fp32", "bf16")


@torch.no_grad()
def embed_dataset(
    model: Sam,
    dataset: Any,
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    shard_size: int = 1000,
    dtype: str = "fp16",
    precision: str = "fp32",
    num_workers: int = 0,
    model_info: Mapping[str, Any] | None = None,
    progress: bool = True,
    deadline: float | None = None,
    until_unit: int | None = None,
) -> list[Path]:
    """Encode every sample of `dataset` once (images [3, S, S] after SamTransform) into shards.

    Writes `out_dir/embeddings-000000.safetensors`, ... (`shard_size` images each, embeddings stored
    as `dtype`: "fp32" exact, "fp16" / "bf16" half the size); older shards in `out_dir` are removed.
    `precision="bf16"` encodes under bf16 autocast. `deadline` (a time.time() value): stop encoding after
    the first batch that ends past it and keep what was encoded (a time-budgeted run). `until_unit`: store
    the image encoder's features entering that unit (`forward_until`) instead of the embeddings, for a
    fine-tune that trains the encoder's later units (the shards record the unit). Returns the shard paths.
    """
    store = storage_dtype(dtype)
    if precision not in PRECISIONS:
        raise ValueError(f"embed precision must be one of {PRECISIONS}, got {precision!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in sorted(out.glob(SHARD_GLOB)):
        log.info("removing old shard %s", stale)
        stale.unlink()
    model.eval()
    device = model.device
    info = {"img_size": model.img_size, **(model_info or {})}
    if until_unit is not None:
        info["encoder_unit"] = until_unit
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=list, pin_memory=device.type == "cuda")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    paths: list[Path] = []
    pending_emb: list[torch.Tensor] = []
    pending: list[dict[str, Any]] = []
    n_images = 0

    def flush(n: int) -> None:
        emb = torch.cat(pending_emb)
        path = out / f"embeddings-{len(paths):06d}.safetensors"
        paths.append(write_embedding_shard(path, emb[:n], pending[:n], img_size=model.img_size, model_info=info))
        pending_emb[:] = [emb[n:]] if n < emb.shape[0] else []
        del pending[:n]

    total = len(dataset) if hasattr(dataset, "__len__") else None
    for samples in tqdm(loader, total=None if total is None else -(-total // batch_size),
                        desc=f"embedding -> {out}", unit="batch", disable=not progress):
        sizes = {tuple(s["image"].shape) for s in samples}
        if sizes != {(3, model.img_size, model.img_size)}:
            raise SamTrainError(f"embed: images must be [3, {model.img_size}, {model.img_size}] after the data "
                                f"config's transform (SamTransform img_size={model.img_size}), got {sorted(sizes)}")
        images = torch.stack([s["image"] for s in samples]).to(device, non_blocking=True)
        with autocast:
            x = model.preprocess(images)
            emb = model.encode(x) if until_unit is None else model.image_encoder.forward_until(x, until_unit)
        pending_emb.append(emb.to(store).cpu())
        pending.extend({k: v for k, v in s.items() if k != "image"} for s in samples)
        n_images += len(samples)
        while len(pending) >= shard_size:
            flush(shard_size)
        if deadline is not None and time.time() >= deadline and (total is None or n_images < total):
            log.warning("embed: time budget reached after %d of %s images", n_images, total)
            break
    if pending:
        flush(len(pending))
    log.info("embedded %d images into %d shards in %s", n_images, len(paths), out)
    return paths
