"""`sam-train engine` (configs/engine.yaml): model in the loop. Each round trains (`commands.fit.fit`),
measures held-out IoU / Dice, then autolabels the image pool; the next round trains on the labelled set +
those labels.

Config: the whole fit config + an `engine` node (rounds, pool, autolabel settings). Rounds live in
`<run_dir>/round_<k>/` (their own fit run directory, `sam_weights.pth`, `autolabel/` shards + stats.json);
`<run_dir>/engine_rounds.json` collects the per-round figures.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from sam_train.commands.build import build_model
from sam_train.commands.fit import fit
from sam_train.engine.autolabel import AutoLabeler, autolabel
from sam_train.engine.loop import WEIGHTS, format_round
from sam_train.errors import SamTrainError
from sam_train.eval.prompted import evaluate_prompted
from sam_train.models.sam import Sam

log = logging.getLogger(__name__)


def round_config(
    cfg: DictConfig, run_dir: Path, *, init: str | None = None, extra_shards: str | None = None
) -> DictConfig:
    """The fit config of one round: its own run dir, weights from the previous round (`init`), training
    data = the configured labelled set, plus `extra_shards` (autolabelled) when given."""
    rcfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    rcfg.run_dir = str(run_dir)  # before resolving: loggers and checkpoints follow ${run_dir}
    # resolved: replacing data.train must not break interpolations that point into it (data.val's transform)
    rcfg = OmegaConf.create(OmegaConf.to_container(rcfg, resolve=True))
    with open_dict(rcfg):
        rcfg.ckpt_path = None
        if init is not None:
            rcfg.model.checkpoint = init
        rcfg.callbacks = dict(rcfg.get("callbacks") or {})
        rcfg.callbacks["engine_weights"] = {"_target_": "sam_train.engine.loop.SaveSamWeights",
                                            "path": str(run_dir / WEIGHTS)}
        if extra_shards is not None:
            labelled = OmegaConf.to_container(rcfg.data.train)
            transform = labelled.get("transform") if isinstance(labelled, dict) else None
            rcfg.data.train = {
                "_target_": "sam_train.engine.shards.union_dataset",
                "datasets": [labelled, {"_target_": "sam_train.engine.shards.ShardSamples", "urls": extra_shards,
                                        "transform": transform}],
            }
        rcfg.pop("engine", None)
    return rcfg


def train_round(cfg: DictConfig, run_dir: str | Path, **kwargs: Any) -> tuple[Path, dict[str, float]]:
    """Run `fit` for one round (see `round_config`); returns (trained weights file, fit metrics)."""
    run_dir = Path(run_dir)
    metrics = fit(round_config(cfg, run_dir, **kwargs))
    return run_dir / WEIGHTS, metrics


def trained_model(rcfg: DictConfig, weights: Path) -> Sam:
    """The round's model config with the round's weights (LoRA merged into them), in eval mode."""
    return build_model(OmegaConf.create({"model": OmegaConf.merge(rcfg.model, {"checkpoint": str(weights)})})).eval()


def held_out_scores(rcfg: DictConfig, model: Sam, modes: tuple[str, ...]) -> dict[str, float]:
    """IoU / Dice on the configured validation set with box / center-point prompts (eval.prompted)."""
    datamodule = instantiate(rcfg.data)
    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    if not loader:
        return {}
    results = evaluate_prompted(model, loader, modes=modes)
    return {f"{m}/{k}": float(results[m][k]) for m in modes for k in ("iou", "dice")}


def train_stats(cfg: DictConfig) -> dict[str, float]:
    """Images and masks per image of a round's training set (un-transformed)."""
    dataset = instantiate(cfg.data.train)
    counts = [int(dataset[i]["masks"].shape[0]) for i in range(len(dataset))]
    return {"train_images": len(counts), "train_masks_per_image": sum(counts) / max(len(counts), 1)}


def run_engine(cfg: DictConfig) -> list[dict[str, Any]]:
    """N rounds of train -> evaluate -> autolabel (see the module docstring)."""
    eng = cfg.engine
    if eng.rounds < 1:
        raise ValueError(f"engine.rounds must be >= 1, got {eng.rounds}")
    if cfg.get("finetune") is not None and cfg.finetune.get("adapter") is not None:
        raise SamTrainError("engine: adapters cannot be merged into the SAM weights a round hands to the next; "
                            "use finetune=full, lora, decoder_only, ...")
    run_dir = Path(str(cfg.run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    init = cfg.model.get("checkpoint")
    shards: str | None = None
    rounds: list[dict[str, Any]] = []
    for r in range(eng.rounds):
        rdir = run_dir / f"round_{r}"
        rcfg = round_config(cfg, rdir, init=init, extra_shards=shards)
        stats = train_stats(rcfg)
        fit_metrics = fit(rcfg)
        weights = rdir / WEIGHTS
        model = trained_model(rcfg, weights)
        held_out = held_out_scores(rcfg, model, tuple(eng.eval_modes))
        pool = instantiate(eng.pool) if not isinstance(eng.pool, str) else eng.pool
        labeler = AutoLabeler(model, **eng.autolabel, existing=eng.pool_masks)
        report = autolabel(labeler, pool, rdir / "autolabel", progress=False, allow_empty=True)
        summary = report.summary()
        record = {
            "round": r,
            **stats,
            "held_out": held_out,
            "val": {k: v for k, v in fit_metrics.items() if k.startswith("val/")},
            "autolabel_images": summary["images"],
            "autolabel_masks_per_image": summary["model_masks_per_image"]["mean"],
            "autolabel_vs_known": summary.get("vs_known"),
            "weights": str(weights),
            "shards": report.shards,
        }
        rounds.append(record)
        log.info("engine round %d: %s", r, json.dumps(record))
        print(format_round(record))
        (run_dir / "engine_rounds.json").write_text(json.dumps(rounds, indent=1))
        # the newest model's labels replace older ones; a round without any label trains on data.train only
        init, shards = str(weights), (str(rdir / "autolabel") if report.shards else None)
    return rounds


main = run_engine
