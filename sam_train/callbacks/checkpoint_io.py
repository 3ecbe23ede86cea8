"""Atomic, weights-only checkpoint I/O for Lightning (`Trainer(plugins=[AtomicCheckpointIO()])`).

Writing: `sam_train.io.atomic_torch_save` (`<path>.tmp`, fsync, `os.replace` over `<path>`, directory
fsync): a kill at any moment leaves either the previous file or the new one, never a truncated file
under the real name.

`checkpoint_dir(trainer)` is the folder the callbacks that save (last.ckpt at epoch end, preemption,
non-finite stops) write into.

Reading: always `torch.load(weights_only=True)`. Our own checkpoints hold only tensors and plain
containers (SamModule does not pickle its config objects); a file that needs arbitrary code to unpickle
(a custom class, a function) is refused with a message naming the file and the offending global.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sam_train.io import atomic_torch_save
from sam_train.models.checkpoint import read_checkpoint_file

log = logging.getLogger(__name__)


def checkpoint_dir(trainer: Any) -> Path:
    """Where a Lightning trainer's checkpoints go: its ModelCheckpoint's dirpath, else
    `<default_root_dir>/checkpoints` (Lightning's own default layout)."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return Path(callback.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"


def load_weights_only(path: str | Path, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True, diagnosed as `read_checkpoint_file` does (not a checkpoint /
    truncated or corrupt / needs code to unpickle: CheckpointError naming the file)."""
    checkpoint = read_checkpoint_file(Path(path))  # on the CPU
    if map_location in (None, "cpu"):
        return checkpoint
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(checkpoint, torch.device(map_location))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: atomic writes (tmp + fsync + rename) and weights-only reads.

    Used for every checkpoint the Trainer writes (ModelCheckpoint's top-k / last, preemption and
    non-finite checkpoints, Lightning's SLURM `hpc_ckpt_*`) and reads (resume).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        if "://" in str(path) and not str(path).startswith("file://"):
            # remote stores (s3://...) commit objects whole: Lightning's fsspec path is atomic there
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            log.warning("%s: weights_only=False was asked for; loading with weights_only=True anyway", path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_weights_only(path, map_location=map_location if map_location is not None else "cpu")
