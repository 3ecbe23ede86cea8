"""The MNI152 demo's slices as an image folder for MAE pretraining (configs/mae_data/mni_demo.yaml).

`sam-train pretrain` itself is `sam_train.commands.pretrain`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)


def mni_demo_image_folder(
    out_dir: str | Path,
    *,
    msd_dir: str | Path,
    subset: str = "train",
    val_fraction: float = 0.34,
    split_seed: int = 0,
) -> str:
    """Write the MNI152 demo's slices as PNGs into `out_dir` (once) and return it: an image folder for
    MAE pretraining on the same images the medical demo fine-tunes on.

    The MSD data set is prepared in `msd_dir` (`sam_train.data.demo.prepare_mni_demo`); `subset`,
    `val_fraction` and `split_seed` select cases exactly as configs/data/mni_demo.yaml does, so the
    default (train) never shows the held-out cases to the encoder.
    """
    from sam_train.data.synthetic import mni_demo_slices

    out = Path(out_dir)
    done = out / ".complete"
    if done.is_file():
        return str(out)
    out.mkdir(parents=True, exist_ok=True)
    slices = mni_demo_slices(root=msd_dir, subset=subset, val_fraction=val_fraction, split_seed=split_seed)
    for i in range(len(slices)):
        sample = slices[i]  # image uint8 [3, H, W]
        name = str(sample["id"]).replace("/", "_")
        Image.fromarray(sample["image"].permute(1, 2, 0).numpy()).save(out / f"{name}.png")
    done.write_text(f"{len(slices)} slices of {msd_dir} ({subset})\n")
    log.info("wrote %d %s slices of the MNI demo to %s", len(slices), subset, out)
    return str(out)
