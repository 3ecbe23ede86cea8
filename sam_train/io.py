"""File helpers: atomic writes, and file names made from ids.

Atomic file writes: a temp file in the target's directory, fsync'ed, then renamed over the target.

`atomic_write(path, write)` is the one implementation: `write(f)` fills `<path>.tmp`, which is flushed and
fsync'ed, `os.replace`d over `path` (atomic on POSIX) and the directory entry fsync'ed. A kill at any
moment leaves either the previous file or the new one, never a truncated file under the real name, and a
failed write removes its temp file. The file gets the usual umask permissions.

Data written on first use (`prepare_*` functions) is written by one process at a time: `written_once` makes
every DDP rank or parallel job that prepares the same folder wait for the one writing it, then find it done.

Reading checkpoints safely (`torch.load(weights_only=True)` with diagnostics) is
`sam_train.models.checkpoint.read_checkpoint_file`.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import torch
from filelock import FileLock

TMP_SUFFIX = ".tmp"
LOCK_SUFFIX = ".lock"
F = TypeVar("F", bound=Callable[..., Any])


def fsync_dir(directory: str | Path) -> None:
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


def atomic_write(path: str | Path, write: Callable[[IO[Any]], object], *, text: bool = False) -> Path:
    """Write `path` atomically: `write(f)` fills `<path>.tmp` (binary, or text with newline="" if `text`),
    then fsync + os.replace + directory fsync. Creates missing parent directories. Returns `path`.

    If anything fails (or the process is killed) before the rename, `path` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "w", newline="") if text else open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save `obj` to `path` atomically (see `atomic_write`). Returns `path`."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """safetensors-serialise `tensors` (with string `metadata`) to `path` atomically. Returns `path`."""
    from safetensors.torch import save

    return atomic_write(path, lambda f: f.write(save(tensors, metadata=metadata)))


def safe_file_name(text: str, default: str = "case") -> str:
    """A file name (no directory parts) from an id such as 'case_001/slice_3': every run of characters
    other than letters, digits, '.', '_' and '-' becomes '__'; leading / trailing '_' are dropped;
    `default` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", "__", text).strip("_") or default


def preparation_lock(out_dir: str | Path) -> FileLock:
    """The inter-process lock on writing the folder `out_dir`: a `.<name>.lock` file beside it."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(out.parent / f".{out.name}{LOCK_SUFFIX}"))


def written_once(prepare: F) -> F:
    """Decorate `prepare(out_dir, ...)`, which writes a data set into `out_dir` unless it is already there:
    calls hold `preparation_lock(out_dir)`, so processes that start together (the ranks of a DDP job) don't
    read files another one is half-way through writing; the later ones find the data set complete."""

    @functools.wraps(prepare)
    def locked(out_dir: str | Path, *args: Any, **kwargs: Any) -> Any:
        try:
            lock = preparation_lock(out_dir)
            lock.acquire()
        except OSError:  # a read-only place: nothing can be written there, so there is no writer to wait for
            return prepare(out_dir, *args, **kwargs)
        try:
            return prepare(out_dir, *args, **kwargs)
        finally:
            lock.release()

    return locked  # type: ignore[return-value]
