"""`sam-train export mae-to-sam checkpoint=... out=... sam_name=...` (configs/export_mae_to_sam.yaml): an MAE
checkpoint -> a SAM checkpoint that `fit model.checkpoint=` starts from (`sam_train.export.mae_to_sam`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sam_train.errors import SamTrainError
from sam_train.export.mae_to_sam import export_mae_to_sam

log = logging.getLogger(__name__)


def main(cfg: DictConfig) -> Path:
    """`sam-train export mae-to-sam checkpoint=... out=... sam_name=...` (configs/export_mae_to_sam.yaml)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise SamTrainError(
            f"missing required value(s) {', '.join(missing)}; e.g. checkpoint=runs/.../last.ckpt out=sam.pth"
        )
    node = cfg.get("overrides")
    overrides: dict[str, Any] = {} if node is None else OmegaConf.to_container(node, resolve=True)  # type: ignore[assignment]
    try:
        out = export_mae_to_sam(
            cfg.checkpoint, cfg.out, cfg.sam_name, cfg.get("img_size"), seed=cfg.get("seed", 0), **overrides
        )
    except FileNotFoundError as exc:
        raise SamTrainError(f"checkpoint={cfg.checkpoint}: no such file") from exc
    except (KeyError, TypeError) as exc:  # unknown sam_name / SamConfig field from the registry
        raise SamTrainError(f"sam_name={cfg.sam_name} / overrides: {exc.args[0] if exc.args else exc}") from exc
    size = f" img_size={cfg.img_size}" if cfg.get("img_size") else ""
    log.info(
        "wrote %s; fine-tune from it with: sam-train fit model=%s model.checkpoint=%s%s", out, cfg.sam_name, out, size
    )
    return out
