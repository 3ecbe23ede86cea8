"""Atomic, weights-only checkpoint I/O for Lightning (`Trainer(plugins=[AtomicCheckpointIO()])`).

Writing: the checkpoint goes to `<path>.tmp`, is fsync'ed, then `os.replace`d over `<path>` (atomic on
POSIX) and the directory entry is fsync'ed: a kill at any moment leaves either the previous file or the
new one, never a truncated file under the real name.

Reading: always `torch.load(weights_only=True)`. Our own checkpoints hold only tensors and plain
containers (SamModule does not pickle its config objects); a file that needs arbitrary code to unpickle
(a custom class, a function) is refused with a message naming the file and the offending global.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sam_train.models.checkpoint import read_checkpoint_file

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: the directory entry must reach the disk too (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save `obj` to `path` through `<path>.tmp` + fsync + os.replace. Returns `path`.

    If anything fails (or the process is killed) before the rename, `path` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


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
