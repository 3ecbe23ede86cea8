"""`sam-train eval` (configs/eval.yaml) and the evaluation at the end of `sam-train fit` (cfg.evaluate):
one pass over the val set with the protocols `sam_train.eval.loop` runs."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sam_train.commands.build import build_model, device
from sam_train.errors import SamTrainError
from sam_train.eval.config import EvalConfig
from sam_train.eval.loop import run_evaluation
from sam_train.models.sam import Sam

log = logging.getLogger(__name__)
OPTIONS = tuple(f.name for f in dataclasses.fields(EvalConfig))


def eval_config(node: DictConfig | None, *, seed: int = 0) -> EvalConfig:
    """The evaluation options of a config node (`cfg.evaluate`, or eval.yaml's top level where they sit)."""
    options: dict[str, Any] = {"seed": seed}
    for key in OPTIONS:
        if node is not None and key in node:
            value = node[key]
            options[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return EvalConfig.from_dict(options)


def val_set(datamodule: Any) -> tuple[Any, Any]:
    """(val dataset, val loader) of a data module; a one-line error when it has no val split."""
    dataset = getattr(datamodule, "val", None)
    if dataset is None:
        raise SamTrainError("the data config has no val split to evaluate on (data.val is null)")
    return dataset, datamodule.val_dataloader()


def load_eval_model(cfg: DictConfig) -> Sam:
    """The model to evaluate: `build_model` (fine-tune strategy, then `checkpoint=`), weights required."""
    return build_model(cfg, require_weights=True)


def initial_model(cfg: DictConfig, model: Sam) -> Sam:
    """The model the fit started from (cfg.model as configured), on the trained model's device."""
    return instantiate(cfg.model).to(model.device)


def evaluate_after_fit(cfg: DictConfig, model: Sam, datamodule: Any, run_dir: Path) -> dict[str, float]:
    """The end of `sam-train fit` when `evaluate` is set: writes <run_dir>/metrics.json and overlays/;
    returns the flat summary ({"eval/box/dice": ..., "eval/filled_box/dice": ...})."""
    config = eval_config(cfg.evaluate, seed=cfg.get("seed", 0))
    model = model.to(device(config.device))
    dataset, loader = val_set(datamodule)
    initial = initial_model(cfg, model) if config.objects.enabled and config.objects.compare_initial else None
    result = run_evaluation(model, loader, config, Path(run_dir), dataset=dataset, initial=initial)
    return {k: float(v) for k, v in result["summary"].items() if v is not None and math.isfinite(v)}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """`sam-train eval`: metrics of cfg.checkpoint on cfg.data's val split, written to cfg.run_dir."""
    config = eval_config(cfg, seed=cfg.get("seed", 0))
    model = load_eval_model(cfg).to(device(config.device))  # checkpoint errors before any output
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    datamodule = instantiate(cfg.data, train=None)  # only the val split is read
    dataset, loader = val_set(datamodule)
    extra = {"checkpoint": str(cfg.get("checkpoint") or cfg.model.get("checkpoint")
                               or f"{cfg.model.name} (bundled pretrained weights)")}
    result = run_evaluation(model, loader, config, run_dir, dataset=dataset, extra=extra)
    log.info("metrics written to %s", run_dir / "metrics.json")
    return result


main = evaluate
