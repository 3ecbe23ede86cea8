"""vit_t learns from random init: after a CPU-minutes budget its box-prompt IoU on held-out toy images
is clearly above the filled-box baseline (the prompt box itself taken as the mask)."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import pytest
import torch

from sam_train.data.datamodule import SamDataModule
from sam_train.data.sample import collate_sam
from sam_train.data.toy_shapes import ToyShapesDataset
from sam_train.data.transforms import SamTransform
from sam_train.eval.prompted import evaluate_prompted
from sam_train.lit.sam_module import SamModule
from sam_train.losses import SamLossConfig
from sam_train.models import build_sam
from sam_train.optim import param_groups
from sam_train.prompts import PromptSimulationConfig

STEPS, LR, SIZE = 1000, 1e-3, 256


@pytest.mark.slow
def test_vit_t_beats_filled_box_baseline_on_held_out_shapes():
    pl.seed_everything(0)
    train = ToyShapesDataset(n=1024, size=64, seed=0, transform=SamTransform(SIZE))
    val = ToyShapesDataset(n=32, size=64, seed=1, transform=SamTransform(SIZE))
    model = build_sam("vit_t", img_size=SIZE)
    module = SamModule(
        model=model,
        prompts=PromptSimulationConfig(num_iterations=1, num_mask_only=0, box_probability=1.0),
        loss=SamLossConfig(),
        optimizer=partial(torch.optim.AdamW, lr=LR, weight_decay=0.01),
        param_groups=partial(param_groups, lr=LR, weight_decay=0.01),
    )
    trainer = pl.Trainer(
        max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    batch = collate_sam([val[i] for i in range(len(val))])
    before = evaluate_prompted(model, [batch], modes=("box", "filled_box"))
    trainer.fit(module, datamodule=SamDataModule(train=train, batch_size=4, persistent_workers=False))
    after = evaluate_prompted(model, [batch], modes=("box", "filled_box"))

    baseline = after["filled_box"]["iou"]
    print(f"held-out IoU: random init {before['box']['iou']:.3f}, trained {after['box']['iou']:.3f}, "
          f"filled box {baseline:.3f}")
    assert before["box"]["iou"] < baseline - 0.2  # the untrained model is far below the baseline
    # measured 0.708 vs 0.637 (seed 0, 2 CPU threads); the margin leaves room for numeric drift
    assert after["box"]["iou"] > baseline + 0.04
    assert after["filled_box"]["iou"] == before["filled_box"]["iou"]  # same held-out data and prompts
