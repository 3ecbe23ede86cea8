"""The model-in-the-loop pieces of `sam-train engine` (`sam_train.commands.engine` runs the rounds): each
round's trained SAM written as official weights, and the one-line round report."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl

from sam_train.models.checkpoint import save_sam_checkpoint

WEIGHTS = "sam_weights.pth"


class SaveSamWeights(pl.Callback):
    """Writes the trained SAM (official flat layout) when training ends, whatever the checkpoint cadence.
    LoRA is merged into the base weights (the next round starts from them and adds fresh LoRA layers).

    Args:
        path: output file (.pth or .safetensors).
    """

    def __init__(self, *, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from sam_train.finetune import merge_and_export_state_dict

        if trainer.is_global_zero:
            save_sam_checkpoint(merge_and_export_state_dict(pl_module.model), self.path)


def format_round(rec: dict[str, Any]) -> str:
    """One line per round: training set, held-out IoU / Dice, autolabel output."""

    def f(x: Any) -> str:
        return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    held = " ".join(f"{k} {f(v)}" for k, v in rec["held_out"].items())
    known = rec.get("autolabel_vs_known") or {}
    vs = f" (vs known: recall {f(known.get('recall'))} precision {f(known.get('precision'))})" if known else ""
    train = (f"trained on {rec['train_images']} images, {rec['train_masks_per_image']:.2f} masks/image; "
             if "train_images" in rec else "")
    return (f"round {rec['round']}: {train}held-out {held}; autolabel {rec['autolabel_masks_per_image']:.2f} "
            f"masks/image on {rec['autolabel_images']} images{vs}")
