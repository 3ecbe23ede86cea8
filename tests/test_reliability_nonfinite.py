"""Non-finite losses / gradients: the step is skipped (parameters untouched), counted and logged with the
batch ids; too many in a row stop training with a clear error after saving the last good state."""

from __future__ import annotations

import dataclasses
import logging
from functools import partial

import lightning.pytorch as pl
import pytest
import torch

from sam_train.callbacks import AtomicCheckpointIO, FaultInjection, NonFiniteError, NonFiniteGuard
from sam_train.data.datamodule import SamDataModule
from sam_train.data.toy_shapes import ToyShapesDataset
from sam_train.data.transforms import SamTransform
from sam_train.lit.sam_module import SamModule
from sam_train.losses.sam_loss import SamLossConfig
from sam_train.optim import param_groups
from sam_train.prompts.interactive import PromptSimulationConfig


class NanLossAt(SamModule):
    """The loss hook under test: returns NaN at the given global steps."""

    nan_steps: tuple[int, ...] = ()

    def run_prompts(self, batch, cfg, gen):
        result = super().run_prompts(batch, cfg, gen)
        if self.training and self.global_step in self.nan_steps:
            result = dataclasses.replace(result, loss=result.loss * torch.nan)
        return result


class ParamTrace(pl.Callback):
    """Copies of the parameters before and after each optimiser step."""

    def __init__(self):
        self.before, self.after = {}, {}

    def _snap(self, module):
        return [p.detach().clone() for p in module.parameters()]

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before[trainer.global_step] = self._snap(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after[trainer.global_step - 1] = self._snap(module)


def build(tiny_sam, nan_steps=()):
    torch.manual_seed(0)
    module = NanLossAt(
        model=tiny_sam,
        prompts=PromptSimulationConfig(num_iterations=2, num_mask_only=1),
        loss=SamLossConfig(),
        optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01),
        param_groups=partial(param_groups, lr=1e-3, weight_decay=0.01),
        report_iterations=(1,),
    )
    module.nan_steps = tuple(nan_steps)
    data = SamDataModule(train=ToyShapesDataset(n=8, size=32, transform=SamTransform(256)), batch_size=2, num_workers=0)
    return module, data


def trainer(tmp_path, callbacks, steps):
    return pl.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=callbacks, plugins=[AtomicCheckpointIO()], gradient_clip_val=1.0,
        enable_checkpointing=False, num_sanity_val_steps=0,
    )  # fmt: skip


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_nan_loss_step_is_skipped_counted_and_logged(tmp_path, tiny_sam, caplog):
    module, data = build(tiny_sam, nan_steps=(1,))
    guard, trace = NonFiniteGuard(max_consecutive=3), ParamTrace()
    with caplog.at_level(logging.WARNING, logger="sam_train.callbacks.nonfinite"):
        trainer(tmp_path, [guard, trace], steps=3).fit(module, datamodule=data)
    assert guard.skipped == 1 and guard.consecutive == 0
    assert float(module.trainer.callback_metrics["train/skipped_steps"]) == 1.0
    assert same(trace.before[1], trace.after[1])  # the NaN step changed nothing
    assert not same(trace.before[0], trace.after[0]) and not same(trace.before[2], trace.after[2])
    assert all(torch.isfinite(p).all() for p in module.parameters())
    (record,) = [r for r in caplog.records if "non-finite" in r.getMessage()]
    assert "step 1" in record.getMessage() and "toy_" in record.getMessage()  # names the batch ids


def test_nan_gradients_are_skipped(tmp_path, tiny_sam):
    module, data = build(tiny_sam)
    guard, trace = NonFiniteGuard(max_consecutive=3), ParamTrace()
    trainer(tmp_path, [FaultInjection(step=0, kind="nan_grad"), guard, trace], steps=2).fit(module, datamodule=data)
    assert guard.skipped == 1
    assert same(trace.before[0], trace.after[0]) and not same(trace.before[1], trace.after[1])


def test_consecutive_bad_steps_stop_with_checkpoint_of_last_good_state(tmp_path, tiny_sam):
    module, data = build(tiny_sam, nan_steps=(1, 2, 3, 4, 5))
    guard, trace = NonFiniteGuard(max_consecutive=2), ParamTrace()
    with pytest.raises(NonFiniteError, match=r"2 consecutive .*last_good\.ckpt"):
        trainer(tmp_path, [guard, trace], steps=6).fit(module, datamodule=data)
    saved = torch.load(tmp_path / "checkpoints" / "last_good.ckpt", map_location="cpu", weights_only=True)
    good = trace.after[0]  # parameters after the last good step
    names = [n for n, _ in module.named_parameters()]
    assert all(torch.equal(saved["state_dict"][n], p) for n, p in zip(names, good, strict=True))
    assert saved["callbacks"]["NonFiniteGuard"]["skipped"] == 2
