"""`sam-train export onnx checkpoint=... out=...` (configs/export_onnx.yaml): the checkpoint's prompt
encoder + mask decoder as ONNX (`sam_train.export.onnx.export_decoder_onnx`); LoRA / adapters only touch
the image encoder, which runs separately."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from sam_train.commands.build import build_model
from sam_train.errors import SamTrainError


def main(cfg: DictConfig) -> Path:
    from sam_train.export.onnx import export_decoder_onnx

    model = build_model(cfg, require_weights=True)
    try:
        path = export_decoder_onnx(
            model,
            cfg.out,
            opset=int(cfg.opset),
            return_single_mask=bool(cfg.return_single_mask),
            dynamo=bool(cfg.dynamo),
        )
    except ValueError as exc:  # bad opset / exporter combination
        raise SamTrainError(str(exc)) from exc
    print(f"wrote {path}")
    return path
