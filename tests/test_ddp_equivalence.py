"""DDP on CPU (gloo, 2 processes, 2 images each) ends with the same parameters as one process with the
same global batch of 4 images: the loss normaliser (objects all-reduced over ranks) and DDP's gradient
averaging together give the single-process gradient. The DDP run also recomputes its prompt loop in
backward (checkpoint_prompt_loop), which must not change the result either."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

SCRIPT = textwrap.dedent(
    """
    import sys
    from functools import partial

    import lightning.pytorch as pl
    import torch

    from sam_train.data.datamodule import SamDataModule
    from sam_train.data.toy_shapes import ToyShapesDataset
    from sam_train.data.transforms import SamTransform
    from sam_train.lit.sam_module import SamModule
    from sam_train.losses import SamLossConfig
    from sam_train.models import build_sam
    from sam_train.optim import param_groups
    from sam_train.prompts import PromptSimulationConfig

    devices, batch_size, out, ckpt = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    torch.set_num_threads(1)
    pl.seed_everything(0)
    data = ToyShapesDataset(n=16, size=64, seed=0, transform=SamTransform(128, max_objects=None))
    model = build_sam("vit_t", img_size=128)
    module = SamModule(
        model=model,
        # deterministic prompts (exact boxes): the per-rank prompt generators then cannot differ
        prompts=PromptSimulationConfig(num_iterations=1, num_mask_only=0, box_probability=1.0, box_jitter="none"),
        loss=SamLossConfig(),
        optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01),
        param_groups=partial(param_groups, lr=1e-3, weight_decay=0.01),
        checkpoint_prompt_loop=ckpt,
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, max_steps=3,
        strategy="ddp_find_unused_parameters_true" if devices > 1 else "auto",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=SamDataModule(train=data, batch_size=batch_size, persistent_workers=False))
    if trainer.global_rank == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
    """
)


def run(tmp_path, devices: int, batch_size: int, checkpoint_prompt_loop: bool) -> dict[str, torch.Tensor]:
    script, out = tmp_path / "train.py", tmp_path / f"params_{devices}.pt"
    script.write_text(SCRIPT, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script), str(devices), str(batch_size), str(out), str(int(checkpoint_prompt_loop))],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    single = run(tmp_path, devices=1, batch_size=4, checkpoint_prompt_loop=False)
    ddp = run(tmp_path, devices=2, batch_size=2, checkpoint_prompt_loop=True)
    init = _initial_params()
    moved = [k for k in single if not torch.equal(single[k], init[k])]
    assert len(moved) > 50  # training really changed the weights
    for key in single:
        if key.endswith("k_proj.bias"):
            # softmax is invariant to a key bias: its true gradient is 0, and AdamW turns the ~1e-9
            # rounding noise (which differs between 1 and 2 processes) into full-size random steps
            continue
        assert torch.allclose(single[key], ddp[key], atol=2e-5, rtol=1e-4), key


def _initial_params() -> dict[str, torch.Tensor]:
    import lightning.pytorch as pl

    from sam_train.models import build_sam

    pl.seed_everything(0)
    return build_sam("vit_t", img_size=128).state_dict()
