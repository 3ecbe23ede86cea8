"""`sam-train pretrain` -> `sam-train export mae-to-sam` -> `sam-train fit model.checkpoint=...` end to end,
plus the MAE recipes / FSDP trainer configs composing as documented."""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sam_train.cli import CONFIG_DIR
from sam_train.commands.fit import fit
from sam_train.commands.pretrain import pretrain
from sam_train.errors import SamTrainError
from sam_train.models import build_sam

PRETRAIN_STEPS = 4


def sam_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    threads = os.environ.get("SAM_TRAIN_TEST_THREADS", "2")
    env = {**os.environ, "OMP_NUM_THREADS": threads, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "sam_train.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def _compose(config: str, overrides: list[str]):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(config, overrides=overrides)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny-demo MAE run directory after PRETRAIN_STEPS optimiser steps through the CLI."""
    tmp = tmp_path_factory.mktemp("pretrain")
    proc = sam_train(
        "pretrain", "recipe=mae_tiny_demo", f"trainer.max_steps={PRETRAIN_STEPS}", f"run_dir={tmp / 'run'}",
        f"data_root={tmp / 'data'}", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        cwd=tmp,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copy(tmp / "run" / "checkpoints" / "last.ckpt", tmp / "mae_step4.ckpt")  # the resume test moves last on
    return tmp


def test_pretrain_writes_checkpoint_and_loss(pretrained):
    run = pretrained / "run"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == PRETRAIN_STEPS
    assert "model.blocks.0.attn.qkv.weight" in ckpt["state_dict"] and "model.decoder_pred.weight" in ckpt["state_dict"]
    rows = list(csv.DictReader((run / "logs" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == PRETRAIN_STEPS and all(math.isfinite(v) and v > 0 for v in losses)
    # MAE lr: base_lr 0.032 x 16 images / 256 = 2e-3; warm-up 10% of 4 steps = 0, then half cosine.
    lrs = [float(r["train/lr"]) for r in rows if r.get("train/lr")]
    expected = [2e-3 * 0.5 * (1 + math.cos(math.pi * k / PRETRAIN_STEPS)) for k in range(PRETRAIN_STEPS)]
    assert lrs == pytest.approx(expected, rel=1e-5)


def test_pretrain_images_are_the_train_cases_only(pretrained):
    from sam_train.data.mni import mni_demo_slices

    pngs = sorted(p.stem for p in (pretrained / "data" / "mni_demo_images" / "train").glob("*.png"))
    kw = dict(root=pretrained / "data" / "mni_demo", val_fraction=0.34, split_seed=0)
    train_cases = mni_demo_slices(subset="train", **kw).case_ids
    val_cases = mni_demo_slices(subset="val", **kw).case_ids
    assert pngs and not set(train_cases) & set(val_cases)
    assert {p.rsplit("__z", 1)[0] for p in pngs} == set(train_cases)  # io.safe_file_name("<case>/z012")


def test_pretrain_resumes_from_last_checkpoint(pretrained, caplog):
    cfg = _compose(
        "pretrain",
        ["recipe=mae_tiny_demo", f"run_dir={pretrained / 'run'}", f"data_root={pretrained / 'data'}",
         f"trainer.max_steps={PRETRAIN_STEPS + 2}", "trainer.enable_progress_bar=false", "~logger",
         "~callbacks.lr_monitor"],
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        pretrain(cfg)
    assert "Restored all states from the checkpoint" in caplog.text  # Lightning's message on resumption
    ckpt = torch.load(pretrained / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == PRETRAIN_STEPS + 2


def test_export_then_fit_starts_from_mae_weights(pretrained, tmp_path):
    mae_ckpt = pretrained / "mae_step4.ckpt"
    out = tmp_path / "sam_init.pth"
    proc = sam_train("export", "mae-to-sam", f"checkpoint={mae_ckpt}", f"out={out}", "sam_name=vit_t", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mae_sd = torch.load(mae_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    sam = build_sam("vit_t", checkpoint=out)
    enc = sam.image_encoder.state_dict()
    block_keys = [k for k in enc if k.startswith("blocks.") and ".rel_pos_" not in k]
    assert len(block_keys) == 4 * 12  # every weight of the 4 blocks comes from the MAE
    for key in block_keys + ["patch_embed.proj.weight"]:
        assert torch.equal(enc[key], mae_sd[f"model.{key}"]), key

    # `sam-train fit ... model.checkpoint=<out>` composes this config and calls `fit` (in-process: one
    # interpreter start less)
    fit_dir = tmp_path / "fit"
    cfg = _compose(
        "fit",
        ["trainer=cpu", f"model.checkpoint={out}", "trainer.max_steps=2", f"run_dir={fit_dir}", "data.train.n=4",
         "data.val.n=2", "data.batch_size=2", "prompts=box_only", "optim.scheduler.warmup_steps=1",
         "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false"],
    )  # fmt: skip
    fit(cfg)
    tuned = torch.load(fit_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    torch.manual_seed(0)
    random_init = build_sam("vit_t").image_encoder.state_dict()
    for key in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.3.mlp.lin2.weight"):
        started = tuned[f"model.image_encoder.{key}"]
        # two AdamW steps at lr <= 1e-4 move each weight by about 2e-4 at most; a random init is far away
        assert (started - enc[key]).abs().max() < 5e-4, key
        assert (started - random_init[key]).abs().max() > 1e-2, key


def test_export_errors_name_the_problem(pretrained, tmp_path):
    from sam_train.commands.export_mae_to_sam import main as export_from_config

    def export(*overrides: str) -> None:
        export_from_config(_compose("export_mae_to_sam", list(overrides)))

    with pytest.raises(SamTrainError, match="checkpoint"):
        export(f"out={tmp_path / 'o.pth'}")
    with pytest.raises(SamTrainError, match="nope.ckpt: no such file"):
        export(f"checkpoint={tmp_path / 'nope.ckpt'}", f"out={tmp_path / 'o.pth'}")
    with pytest.raises(SamTrainError, match="mae_vit_t -> vit_t"):  # a vit_t-sized MAE into vit_b
        export(f"checkpoint={pretrained / 'mae_step4.ckpt'}", f"out={tmp_path / 'o.pth'}", "sam_name=vit_b")
    assert not (tmp_path / "o.pth").exists()


def test_mae_vit_b_recipe_composes():
    proc = sam_train("pretrain", "recipe=mae_vit_b", "--cfg", "job", cwd=Path.cwd())
    assert proc.returncode == 0, proc.stderr
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.name == "mae_vit_b" and cfg.mae_model.name == "mae_vit_b" and cfg.mae_model.img_size == 224
    assert OmegaConf.is_missing(cfg.mae_data, "root")
    assert list(cfg.module.optimizer.betas) == [0.9, 0.95] and cfg.module.weight_decay == 0.05
    assert cfg.module.base_lr == 1.5e-4 and cfg.module.warmup_fraction * cfg.trainer.max_epochs == 40
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.max_epochs == 800
    assert cfg.mae_data.batch_size * 8 * cfg.trainer.accumulate_grad_batches == 4096  # on 8 GPUs
    assert "wandb" in cfg.logger


def test_missing_data_root_is_a_user_error():
    cfg = _compose("pretrain", ["recipe=mae_vit_b"])
    with pytest.raises(SamTrainError, match=r"mae_data\.root"):
        pretrain(cfg)


def test_fsdp_trainer_wraps_vit_blocks():
    from lightning.pytorch.strategies import FSDPStrategy

    from sam_train.models.image_encoder import Block

    cfg = _compose(
        "pretrain",
        ["recipe=mae_vit_b", "mae_model=mae_vit_h", "trainer=fsdp_vit", "mae_data=shards",
         "mae_data.shards='/data/imgs-{000..009}.tar'", "trainer.max_steps=1000"],
    )  # fmt: skip
    assert cfg.mae_model.name == "mae_vit_h" and cfg.mae_model.grad_checkpointing  # command line beats the recipe
    assert cfg.mae_data.shards == "/data/imgs-{000..009}.tar" and cfg.trainer.precision == "bf16-mixed"
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
