"""Seeds derived by hashing, and reseeding of the global generators.

`derive_seed(*parts)` is the one place a seed is hashed from a tuple (run seed, rank, step, sample...):
the same parts give the same 63-bit seed on every process and after a resume, unlike Python's `hash`.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from `parts` (ints / strings): blake2b of their repr, the same on any process and run."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seed_global_rngs(seed: int) -> None:
    """Reseed torch's (CPU and CUDA), numpy's and Python's global generators.

    Called with a step seed before every training batch: whatever draws from them during the step
    (drop path, dropout, a library's augmentation) is then a pure function of the step, so a resumed run
    repeats the uninterrupted run exactly, on every rank, without saving generator states.
    """
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
