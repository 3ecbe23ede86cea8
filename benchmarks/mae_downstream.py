"""Does MAE pretraining help? Held-out box-prompt Dice of the medical demo from random vs MAE init.

1. MAE-pretrain the tiny MAE whose encoder is SAM vit_t's (recipe mae_tiny_demo) on the MNI demo's
   training slices for a fixed number of steps.
2. Export it into vit_t (`export_mae_to_sam`). The random-init baseline is the same SAM template
   (same seed) without the MAE encoder weights: the two starts differ only in the image encoder.
3. Fine-tune both with recipe medical_vit_t, the same steps, seed and data order.
4. Print box-prompt Dice / IoU on the held-out cases (and the filled-box baseline) for both.

    python benchmarks/mae_downstream.py            # ~10-15 minutes on 2 busy CPU cores
    python benchmarks/mae_downstream.py --smoke    # a few steps each: checks the pipeline runs
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from sam_train.cli import CONFIG_DIR
from sam_train.commands.fit import fit
from sam_train.commands.pretrain import pretrain
from sam_train.eval.prompted import evaluate_prompted
from sam_train.export.mae_to_sam import export_mae_to_sam
from sam_train.models import build_sam
from sam_train.models.checkpoint import save_sam_checkpoint


def _compose(config: str, overrides: list[str]):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(config, overrides=overrides)


def random_init_checkpoint(out: Path, seed: int) -> Path:
    """vit_t drawn exactly as `export_mae_to_sam(seed=seed)` draws its template, without MAE weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return save_sam_checkpoint(build_sam("vit_t"), out)


def finetune_and_evaluate(init: Path, run_dir: Path, data_root: Path, steps: int, seed: int) -> dict[str, float]:
    """Fine-tune vit_t from `init` with recipe medical_vit_t; box / filled-box Dice on the val cases."""
    cfg = _compose(
        "fit",
        [
            "recipe=medical_vit_t",
            "~evaluate",  # scored below, on exactly the same loader for both inits
            f"model.checkpoint={init}",
            f"run_dir={run_dir}",
            f"data_root={data_root}",
            f"seed={seed}",
            f"trainer.max_steps={steps}",
            f"optim.scheduler.warmup_steps={max(1, min(20, steps // 10))}",
            "trainer.limit_val_batches=0",
            "trainer.enable_progress_bar=false",
            f"callbacks.model_checkpoint.every_n_train_steps={steps}",
        ],
    )
    start = time.perf_counter()
    fit(cfg)
    train_s = time.perf_counter() - start
    model = build_sam("vit_t", checkpoint=run_dir / "checkpoints" / "last.ckpt")
    datamodule = instantiate(cfg.data)
    res = evaluate_prompted(model, datamodule.val_dataloader(), modes=("box", "filled_box"))
    return {
        "box_dice": res["box"]["dice"],
        "box_iou": res["box"]["iou"],
        "filled_box_dice": res["filled_box"]["dice"],
        "train_s": train_s,
    }


def run(out_dir: Path, *, pretrain_steps: int, finetune_steps: int, seed: int) -> dict[str, dict[str, float]]:
    data_root = out_dir / "data"
    pre_cfg = _compose(
        "pretrain",
        [
            "recipe=mae_tiny_demo",
            f"run_dir={out_dir / 'mae'}",
            f"data_root={data_root}",
            f"seed={seed}",
            f"trainer.max_steps={pretrain_steps}",
            "trainer.enable_progress_bar=false",
            "module.image_log_every_n_steps=0",
            f"callbacks.model_checkpoint.every_n_train_steps={pretrain_steps}",
        ],
    )
    start = time.perf_counter()
    pre_metrics = pretrain(pre_cfg)
    pretrain_s = time.perf_counter() - start
    inits = {
        "random": random_init_checkpoint(out_dir / "init_random.pth", seed),
        "mae": export_mae_to_sam(
            out_dir / "mae" / "checkpoints" / "last.ckpt", out_dir / "init_mae.pth", "vit_t", seed=seed
        ),
    }
    results = {
        name: finetune_and_evaluate(path, out_dir / f"fit_{name}", data_root, finetune_steps, seed)
        for name, path in inits.items()
    }
    results["mae"]["pretrain_s"] = pretrain_s
    results["mae"]["pretrain_loss"] = pre_metrics.get("train/loss", float("nan"))
    return results


def format_table(results: dict[str, dict[str, float]], pretrain_steps: int, finetune_steps: int) -> str:
    rnd, mae = results["random"], results["mae"]
    ratio = mae["box_dice"] / rnd["box_dice"] if rnd["box_dice"] else float("nan")
    lines = [
        f"medical demo (MNI152 grey / white matter, held-out cases), vit_t fine-tuned {finetune_steps} steps; "
        f"MAE pretrained {pretrain_steps} steps ({mae['pretrain_s']:.0f} s, final loss {mae['pretrain_loss']:.3f})",
        "| init | box Dice | box IoU | fine-tune s |",
        "|---|---|---|---|",
        f"| random | {rnd['box_dice']:.4f} | {rnd['box_iou']:.4f} | {rnd['train_s']:.0f} |",
        f"| MAE | {mae['box_dice']:.4f} | {mae['box_iou']:.4f} | {mae['train_s']:.0f} |",
        f"| filled box (no model) | {rnd['filled_box_dice']:.4f} | - | - |",
        f"difference MAE - random box Dice: {mae['box_dice'] - rnd['box_dice']:+.4f}",
        f"ratio MAE / random box Dice: {ratio:.3f}x",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_mae_downstream"), help="work directory")
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--finetune-steps", type=int, default=300, help="as recipe medical_vit_t")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--smoke", action="store_true", help="3 pretraining and 2 fine-tuning steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.pretrain_steps, args.finetune_steps = 3, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    results = run(args.out, pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps, seed=args.seed)
    print(format_table(results, args.pretrain_steps, args.finetune_steps))
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
